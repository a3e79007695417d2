"""The app in a real browser: Debian's headless Chromium driven by Selenium (chromium-driver
from apt; nothing downloaded). Loads the page, picks a class, presses Generate, sees the preview
image change at least 3 times, downloads the PNG. With DETAILFLOW_APP_SCREENSHOT=path it also
saves a screenshot of the finished page there (docs/app.png is made this way)."""
import os
import pathlib
import shutil
import socket
import time

import pytest
from gpt_helpers import converted_gpt_dir

from detailflow_jax import app as app_cli

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# Every src the preview <img> takes, recorded in the page as it happens (polling could miss some).
RECORD_PREVIEWS = """
window.__previews = [];
new MutationObserver(() => {
  for (const img of document.querySelectorAll('#preview img')) {
    const last = window.__previews[window.__previews.length - 1];
    if (img.src && img.src !== last) window.__previews.push(img.src);
  }
}).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="apt-get install chromium chromium-driver")
def test_generate_in_chromium(tmp_path, tmp_path_factory, tokenizer_dir):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait

  app = app_cli.build(tokenizer_dir, converted_gpt_dir(tmp_path_factory), max_batch=4,
                      all_previews=True)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  page = app.launch(port=port, server_name="127.0.0.1", prevent_thread_lock=True)
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
    options.add_argument(flag)
  options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                            "download.prompt_for_download": False})
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
  try:
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 120)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#class input"))
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("class 3", Keys.ENTER)  # a name typed in: the app resolves it to its id
    count = driver.find_element(By.CSS_SELECTOR, "#num_images input")
    count.send_keys(Keys.CONTROL, "a")
    count.send_keys("4", Keys.TAB)  # the change lands on blur
    driver.execute_script(RECORD_PREVIEWS)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    wait.until(lambda d: "done:" in d.find_element(By.CSS_SELECTOR, "#status").text)
    previews = driver.execute_script("return window.__previews")
    assert len(previews) >= 3, previews
    command = driver.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
    assert "--labels 3,3,3,3 " in command, command  # the class picked by name
    driver.find_element(By.CSS_SELECTOR, "#png a").click()
    deadline = time.time() + 30
    while time.time() < deadline and not list(downloads.glob("*.png")):
      time.sleep(0.2)
    pngs = list(downloads.glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    screenshot = os.environ.get("DETAILFLOW_APP_SCREENSHOT")
    if screenshot:
      pathlib.Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
      driver.save_screenshot(screenshot)
  except Exception:
    driver.save_screenshot(str(tmp_path / "failure.png"))
    raise
  finally:
    driver.quit()
    page.close()
