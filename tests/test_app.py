"""`python -m detailflow_jax.app` on the fixture models, served on 127.0.0.1 and driven with
gradio_client: streamed previews of growing resolution, a final result whose tokens equal the
`sample` command line it prints, batching of concurrent clients (sampler calls counted), and
one clear message per bad input while the server keeps serving."""
import re
import shlex
import socket
import threading

import jax
import numpy as np
import pytest
from gpt_helpers import converted_gpt_dir

from detailflow_jax import app as app_cli
from detailflow_jax import sample as sample_cli
from detailflow_jax.inference.sampler import Sampler, SamplingOptions

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

GOOD = dict(class_value="3: class 3", num_images=2, cfg_scale=1.5, gradual_cfg=False,
            temperature=1.0, top_k=0, top_p=1.0, num_tokens=32, seed=7)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
  app = app_cli.build(tokenizer_dir, converted_gpt_dir(tmp_path_factory), max_batch=4,
                      all_previews=True)  # every preview reaches the client (skipping: below)
  app.traces_after_warm_up = app.batcher.sampler.trace_count
  app.decodes_after_warm_up = set(app.batcher.decoded_shapes)
  app.decode_traces_after_warm_up = app.batcher.fns.decode_prefix_traces
  port = free_port()
  page = app.launch(port=port, server_name="127.0.0.1", prevent_thread_lock=True)
  client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
  yield app, client
  client.close()
  page.close()


def generate(client, **overrides):
  return client.submit(*dict(GOOD, **overrides).values(), api_name="/generate")


def test_previews_grow_then_the_final_tokens_equal_the_sample_cli(served, tmp_path):
  app, client = served
  job = generate(client)
  job.result()
  outputs = job.outputs()  # every yield: the previews, then the final result
  statuses = [o[0] for o in outputs]
  previews = [re.match(r"(\d+) / 32 tokens: (\d+) px", s) for s in statuses[:-1]]
  assert all(previews), statuses
  sides = [int(m.group(2)) for m in previews]
  counts = [int(m.group(1)) for m in previews]
  steps = app.batcher.sampler.step_token_counts(32)
  # the first count of each of the 3 coarsest resolutions (one token first), then the final's
  assert counts == [1, 4, 8, 32] == [steps[s - 1] for s in app.batcher.preview_steps(32)] + [32]
  assert sides == sorted(sides) and len(set(sides)) == 4, sides
  assert statuses[-1].startswith("done: 2 image(s), 32 tokens")
  status, preview, final, strip, png, tokens_file, command = outputs[-1]
  tokens = np.load(tokens_file)
  assert tokens.shape == (2, 32)
  # the printed command line, run as printed (outputs redirected), gives the same tokens
  args = shlex.split(command)
  assert args[:3] == ["python", "-m", "detailflow_jax.sample"]
  args = args[3:]
  args[args.index("--out") + 1] = str(tmp_path / "cli.png")
  args[args.index("--save-tokens") + 1] = str(tmp_path / "cli.npy")
  assert sample_cli.main(args) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "cli.npy"), tokens)
  from PIL import Image
  assert Image.open(png).size == Image.open(tmp_path / "cli.png").size


def test_concurrent_clients_share_sampler_calls(served):
  app, client = served
  calls = app.batcher.sampler_calls
  jobs = [None] * 8
  def submit(i):
    jobs[i] = generate(client, num_images=1, seed=100 + i, class_value=f"{i % 10}")
  threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  finals = [np.load(job.result()[5]) for job in jobs]
  used = app.batcher.sampler_calls - calls
  assert used < 8, f"8 requests took {used} sampler calls"
  assert used >= 2  # 4 rows per call
  assert max(app.batcher.batch_sizes[-used:]) > 1
  # batched rows equal the request run alone (per-row keys; another Sampler keeps the app's trace count)
  for i in (0, 5):
    alone = Sampler(app.batcher.sampler.graphdef).sample(app.batcher.params, np.asarray([i % 10]),
                                       jax.random.split(jax.random.key(100 + i), 1),
                                       SamplingOptions(cfg_scale=GOOD["cfg_scale"]))
    np.testing.assert_array_equal(finals[i], np.asarray(alone))


@pytest.mark.parametrize("overrides,message", [
    (dict(class_value="10"), "class 10 is out of range"),
    (dict(class_value="no such class"), "is not one of"),
    (dict(num_tokens=0), "token budget must be an integer in \\[1, 32\\]"),
    (dict(num_tokens=33), "token budget must be an integer in \\[1, 32\\]"),
    (dict(num_images=5), "number of images must be an integer in \\[1, 4\\]"),
    (dict(top_k=-1), "top-k must be an integer in \\[0, "),
])
def test_bad_input_gets_its_message_and_the_server_keeps_serving(served, overrides, message):
  app, client = served
  with pytest.raises(AppError, match=message):
    generate(client, **overrides).result()
  assert generate(client, num_images=1, num_tokens=4).result()[0].startswith("done: 1 image(s), 4 tokens")


def test_past_the_bounded_queue_a_request_is_told_busy(served):
  app, client = served
  app.batcher.max_waiting = 0
  try:
    with pytest.raises(AppError, match="busy"):
      generate(client).result()
  finally:
    app.batcher.max_waiting = 16
  assert generate(client, num_images=1).result()[0].startswith("done")


def test_no_models_gives_a_one_line_hint(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert app_cli.main([]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "python -m detailflow_jax.demo" in err
  assert app_cli.main(["--tokenizer", str(tmp_path / "missing"), "--gpt", str(tmp_path / "missing")]) == 2
  assert "missing" in capsys.readouterr().err


def test_class_names():
  names = app_cli.class_names(1000, shapes=False)
  assert len(names) == 1000 and names[207] == "golden retriever" and names[0].startswith("tench")
  assert app_cli.class_names(6, shapes=True)[:2] == ["red disc", "green square"]
  assert app_cli.parse_class("207: golden retriever", names) == 207
  assert app_cli.parse_class("Golden Retriever", names) == 207


def test_nothing_compiled_while_serving(served):
  """Runs last: every request above reused the programs the start-up compiled."""
  app, _ = served
  assert app.batcher.sampler.trace_count == app.traces_after_warm_up
  # one decode program per decode resolution (a prefix padded to its resolution's bucket),
  # all compiled by the warm-up: budgets 32 and 4 and every preview reused them
  assert app.batcher.fns.decode_prefix_traces == app.decode_traces_after_warm_up
  assert app.batcher.decoded_shapes == app.decodes_after_warm_up
  schedule = app.batcher.schedule
  sides = {schedule.decode_resolution(t) for t in range(1, 33)}
  assert app.decode_traces_after_warm_up == len(sides) == len(app.decodes_after_warm_up) == 8
  assert app.decodes_after_warm_up == {(4, schedule.decode_token_bucket(t), schedule.decode_resolution(t))
                                       for t in range(1, 33)}


def test_a_page_that_falls_behind_skips_to_the_newest_preview(served, monkeypatch):
  """Updates that queued up while the page was busy: one preview (the newest) is sent, then the
  final result, whose strip still holds every preview."""
  app, _ = served
  batcher = app.batcher
  request = app.request("1", 1, 1.5, False, 1.0, 0, 1.0, 32, 0)
  counts = batcher.sampler.step_token_counts(32)
  for t in counts:
    side = batcher.schedule.decode_resolution(t)
    request.updates.put(("preview", t, side, np.zeros((1, side, side, 3), np.float32)))
  request.updates.put(("final", np.zeros((1, 32), np.int32)))
  monkeypatch.setattr(batcher, "submit", lambda r: request)
  monkeypatch.setattr(app, "all_previews", False)
  outputs = list(app.generate("1", 1, 1.5, False, 1.0, 0, 1.0, 32, 0))
  assert len(outputs) == 1 and outputs[0][0].startswith("done")  # all had arrived: no preview
  from PIL import Image
  strip = np.asarray(Image.open(outputs[0][3]))
  assert strip.shape[1] >= len(counts) * batcher.image_size
