"""`python -m detailflow_jax.app [--tokenizer X --gpt Y] [--port P] [--share]`: watch DetailFlow
images arrive coarse to fine, in the browser (Gradio).

Every prefix of a DetailFlow token sequence is already an image at the resolution those tokens
stand for (the schedule's token2dec_out_res). The app samples with `Sampler.sample_stream` and
decodes each prefix as it arrives, enlarged (nearest) to the display size: one token is a colour,
a few are the layout, the rest add detail. X / Y are anything `python -m detailflow_jax.sample`
takes (converted directories, run directories, Hub ids); with neither, the models the embedded
demo trained (./detailflow_demo, `python -m detailflow_jax.demo`).

Previews cost decodes, so by default there are three (--previews N): at the first token count
of each of the three coarsest resolutions, then the final image; sampling runs in that many
segments only, and each preview decode is dispatched before the next segment, its pixels pulled
while that segment runs. --previews all decodes every step.

Concurrent requests with the same sampling options and budget are batched into one sampler call
(per-row keys, so an image depends only on its own seed and label, never on who it shared a
batch with). Every call is padded to --max-batch rows, so the programs compiled at start-up (the
stream's two, one decode per decode resolution) serve every request: nothing compiles while
serving. The cost: at low load a GPU runs the padded rows too (a decode step is memory-bound
there, so nearly free); on a CPU a lone request pays for the full batch.
At most --max-waiting requests wait; past that a request gets a "busy" message at once.
The page shows the exact `sample` command line that reproduces each result.
"""
import argparse
import dataclasses
import pathlib
import queue
import sys
import tempfile
import threading
import time

import numpy as np

from .inference import images as image_io

DEMO_DIR = pathlib.Path("detailflow_demo")
DEMO_MODELS = {"tokenizer": DEMO_DIR / "tokenizer" / "export", "gpt": DEMO_DIR / "gpt" / "export"}
NO_MODELS_HINT = ("no models: train the demo's with `python -m detailflow_jax.demo` (writes "
                  "./detailflow_demo) or pass --tokenizer X --gpt Y (directories or Hub ids, e.g. "
                  "ByteFlow-AI/DetailFlow-16 and ByteFlow-AI/DetailFlow-16-GPT-L)")
MIN_DISPLAY = 256  # previews are enlarged (nearest) to at least this many pixels a side
DEFAULT_PREVIEWS = 3  # the acceptance's minimum; on DetailFlow-16 they cost ~5 % of a batch (docs/app.md)


class BusyError(RuntimeError):
  """The bounded request queue is full."""


def imagenet_class_names() -> list[str]:
  """ImageNet's 1000 class names in class-id order, from the list tensorflow-datasets ships
  (SI-Score's IMAGENET_LABELS_LIST; imagenet2012/labels.txt holds only WordNet ids)."""
  from tensorflow_datasets.datasets.siscore.labels import IMAGENET_LABELS_LIST
  if len(IMAGENET_LABELS_LIST) != 1000:
    raise ValueError(f"expected 1000 ImageNet names, tensorflow-datasets has {len(IMAGENET_LABELS_LIST)}")
  return list(IMAGENET_LABELS_LIST)


def class_names(num_classes: int, shapes: bool) -> list[str]:
  """Names of a GPT's classes: ImageNet's for 1000 classes, the procedural shapes' (the demo's
  classes) with `shapes`, else "class k"."""
  if num_classes == 1000:
    return imagenet_class_names()
  if shapes:
    from .demo.run import class_names as shape_names
    return shape_names(num_classes)
  return [f"class {k}" for k in range(num_classes)]


@dataclasses.dataclass
class Request:
  """One user's request: `labels` [n] (one image each), per-row keys from `seed`."""
  labels: np.ndarray
  seed: int
  options: object  # SamplingOptions
  num_tokens: int
  updates: queue.Queue = dataclasses.field(default_factory=queue.Queue)

  @property
  def batch_key(self):
    """Requests that may share one sampler call: options are per call, not per row."""
    return (self.options, self.num_tokens)


class StreamingBatcher:
  """Owns the GPT, the tokenizer and one worker thread that serves the waiting requests in
  batches: it takes the oldest request, waits `window_s` for others with the same options and
  budget (up to `max_batch` images), runs one `sample_stream` over all of them and sends every
  request its rows of each preview. A request therefore waits for at most the batch in flight.

  previews: how many before the final image (`preview_steps`), or None for every decode step.

  Per request, `updates` receives ("preview", t, side, images [n, s, s, 3] in [-1, 1]) for every
  yielded prefix, then ("final", tokens [n, T]) or ("error", message).
  """

  def __init__(self, gpt, tokenizer, *, max_batch: int = 8, max_waiting: int = 16,
               window_s: float = 0.05, previews: int | None = DEFAULT_PREVIEWS):
    from .inference.sampler import Sampler
    from .inference.tokenizer import TokenizerFns
    if max_batch < 1:
      raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if previews is not None and (isinstance(previews, bool) or not isinstance(previews, int) or previews < 0):
      raise ValueError(f"previews must be an integer >= 0 or None (every step), got {previews!r}")
    self.config = gpt.config
    self.sampler = Sampler(gpt)
    self.params = self.sampler.prepare_weights(gpt)  # what the sample CLI streams: the same tokens
    self.fns = TokenizerFns(tokenizer)
    self.schedule = tokenizer.schedule
    self.image_size = tokenizer.config.image_size
    self.max_batch, self.max_waiting, self.window_s, self.previews = max_batch, max_waiting, window_s, previews
    self.sampler_calls = 0
    self.batch_sizes: list[int] = []   # images per sampler call (before padding)
    self.decoded_shapes = set()        # (rows, padded tokens, side) of every decode run
    self._waiting: list[Request] = []
    self._cond = threading.Condition()
    self._worker = threading.Thread(target=self._loop, name="detailflow-app-batcher", daemon=True)
    self._worker.start()

  # --- requests -----------------------------------------------------------------------

  def submit(self, request: Request) -> Request:
    with self._cond:
      if len(self._waiting) >= self.max_waiting:
        raise BusyError(f"busy: {len(self._waiting)} requests are already waiting; try again in a "
                        "few seconds")
      self._waiting.append(request)
      self._cond.notify()
    return request

  def _take_batch(self) -> list[Request]:
    with self._cond:
      while not self._waiting:
        self._cond.wait()
    time.sleep(self.window_s)  # let concurrent requests join this batch
    with self._cond:
      first = self._waiting[0]
      batch, rows = [], 0
      for r in list(self._waiting):
        if r.batch_key == first.batch_key and rows + len(r.labels) <= self.max_batch:
          batch.append(r)
          rows += len(r.labels)
      for r in batch:
        self._waiting.remove(r)
    return batch

  def _loop(self):
    while True:
      batch = self._take_batch()
      try:
        self.run_batch(batch)
      except Exception as e:  # noqa: BLE001  the worker must outlive any one batch
        for r in batch:
          r.updates.put(("error", f"{type(e).__name__}: {e}"))

  # --- one sampler call ---------------------------------------------------------------

  def preview_steps(self, num_tokens: int) -> list[int]:
    """The decode steps (counts of steps run, as Sampler.sample_stream's at_steps) after which
    a preview is decoded for a budget of `num_tokens`: the first step of each of the `previews`
    coarsest resolutions below the final one (1 token = a colour first), or every step but the
    last (previews=None). The final image follows the last step in any case."""
    counts = self.sampler.step_token_counts(num_tokens)
    if self.previews is None:
      return list(range(1, len(counts)))
    final_side = self.schedule.decode_resolution(counts[-1])
    steps, sides = [], set()
    for step, t in enumerate(counts[:-1], start=1):
      side = self.schedule.decode_resolution(t)
      if len(steps) < self.previews and side < final_side and side not in sides:
        steps.append(step)
        sides.add(side)
    return steps

  def _decode(self, tokens: np.ndarray):
    """Dispatches the decode of host tokens [rows, t] (one program per decode resolution) and
    returns the device array without waiting for it."""
    t = tokens.shape[1]
    self.decoded_shapes.add((len(tokens), self.schedule.decode_token_bucket(t),
                             self.schedule.decode_resolution(t)))
    return self.fns.decode_prefix(tokens)

  def run_batch(self, batch: list[Request]) -> None:
    import jax
    rows = sum(len(r.labels) for r in batch)
    padded = self.max_batch  # one batch shape: the start-up programs serve every call
    labels = np.zeros(padded, np.int32)
    labels[:rows] = np.concatenate([r.labels for r in batch])
    keys = [jax.random.split(jax.random.key(r.seed), len(r.labels)) for r in batch]
    keys.append(jax.random.split(jax.random.key(0), padded - rows))  # padding rows, discarded
    keys = jax.numpy.concatenate(keys)
    first = batch[0]
    self.sampler_calls += 1
    self.batch_sizes.append(rows)
    stream = self.sampler.sample_stream(self.params, labels, keys, first.options, num_tokens=first.num_tokens,
                                        at_steps=self.preview_steps(first.num_tokens))
    starts = np.cumsum([0] + [len(r.labels) for r in batch])
    prefix = next(stream)
    while prefix is not None:
      tokens = np.asarray(prefix)       # waits for this segment
      decoding = self._decode(tokens)   # dispatched, not awaited
      prefix = next(stream, None)       # the next segment is queued before the preview is pulled
      t = tokens.shape[1]
      side = self.schedule.decode_resolution(t)
      decoded = np.clip(np.asarray(decoding, np.float32), -1, 1)
      for r, lo, hi in zip(batch, starts[:-1], starts[1:]):
        r.updates.put(("preview", t, side, decoded[lo:hi]))
    for r, lo, hi in zip(batch, starts[:-1], starts[1:]):
      r.updates.put(("final", tokens[lo:hi]))

  def warm_up(self) -> None:
    """Compiles, before the first user arrives, the padded batch's stream (with and without
    guidance when the GPT has a null class) and the decode of every resolution a budget can
    end at or preview (so no budget compiles while serving)."""
    from .inference.sampler import SamplingOptions
    variants = [SamplingOptions(cfg_scale=1.0)]
    if self.config.has_null_class:
      variants.append(SamplingOptions(cfg_scale=1.5))
    for options in variants:
      request = Request(np.zeros(self.max_batch, np.int32), 0, options, self.config.block_size)
      self.run_batch([request])
    done = {side for _, _, side in self.decoded_shapes}
    for t in range(1, self.config.block_size + 1):
      if self.schedule.decode_resolution(t) not in done:
        done.add(self.schedule.decode_resolution(t))
        np.asarray(self._decode(np.zeros((self.max_batch, t), np.int32)))
    self.sampler_calls, self.batch_sizes = 0, []


# --- the page ------------------------------------------------------------------------------

def sample_command(tokenizer_src: str, gpt_src: str, labels, seed: int, options, num_tokens: int,
                   weights: dict[str, str | None]) -> str:
  """The `python -m detailflow_jax.sample` command line that reproduces a result exactly."""
  parts = ["python -m detailflow_jax.sample", f"--tokenizer {tokenizer_src}", f"--gpt {gpt_src}"]
  for name in ("tokenizer", "gpt"):
    if weights.get(name):
      parts.append(f"--{name}-weights {weights[name]}")
  parts += [f"--labels {','.join(str(int(v)) for v in labels)}", f"--seed {seed}", "--row-keys",
            f"--cfg-scale {options.cfg_scale:g}", f"--temperature {options.temperature:g}",
            f"--top-k {options.top_k}", f"--top-p {options.top_p:g}", f"--num-tokens {num_tokens}"]
  if options.gradual_cfg:
    parts.append("--gradual-cfg")
  parts += ["--out samples.png", "--save-tokens tokens.npy"]
  return " ".join(parts)


def parse_class(value, names: list[str]) -> int:
  """A class from the dropdown: "k: name", a bare id or an exact name -> its id (checked)."""
  text = str(value if value is not None else "").strip()
  head = text.split(":", 1)[0].strip()
  try:
    k = int(float(head))
  except ValueError:
    lowered = [n.lower() for n in names]
    if text.lower() not in lowered:
      raise ValueError(f"class {text!r} is not one of this GPT's {len(names)} class names") from None
    k = lowered.index(text.lower())
  if not 0 <= k < len(names):
    raise ValueError(f"class {k} is out of range: this GPT has {len(names)} classes (0-{len(names) - 1})")
  return k


class App:
  """The Gradio page over one StreamingBatcher: validation, previews, final outputs."""

  def __init__(self, batcher: StreamingBatcher, names: list[str], tokenizer_src: str, gpt_src: str,
               weights: dict[str, str | None] | None = None, out_dir=None,
               all_previews: bool = False):
    self.batcher, self.names, self.all_previews = batcher, names, all_previews
    self.tokenizer_src, self.gpt_src, self.weights = tokenizer_src, gpt_src, weights or {}
    self.out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="detailflow-app-"))
    self.display = max(batcher.image_size, MIN_DISPLAY)
    self._count = 0
    self._lock = threading.Lock()

  def request(self, class_value, num_images, cfg_scale, gradual_cfg, temperature, top_k, top_p,
              num_tokens, seed) -> Request:
    """A checked Request; ValueError names the first bad control."""
    from .inference.sampler import SamplingOptions
    cfg = self.batcher.config

    def integer(value, name, low, high):
      try:
        v = float(value)
      except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
      if v != int(v) or not low <= v <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
      return int(v)

    label = parse_class(class_value, self.names)
    n = integer(num_images, "number of images", 1, self.batcher.max_batch)
    budget = integer(num_tokens, "token budget", 1, cfg.block_size)
    seed = integer(seed, "seed", 0, 2**31 - 1)
    options = SamplingOptions(cfg_scale=float(cfg_scale), temperature=float(temperature),
                              top_k=integer(top_k, "top-k", 0, cfg.vocab_size), top_p=float(top_p),
                              gradual_cfg=bool(gradual_cfg)).check()
    if options.guidance and not cfg.has_null_class:
      raise ValueError("this GPT has no null class: use a CFG scale <= 1")
    return Request(np.full(n, label, np.int32), seed, options, budget)

  def preview_grid(self, images) -> np.ndarray:
    """Images [n, s, s, 3] in [-1, 1] -> a uint8 grid, each enlarged (nearest) to the display
    size (converted to uint8 first: the conversion then runs on s x s pixels, not the display's)."""
    per_row = min(len(images), 4)
    enlarged = [image_io.enlarge_nearest(x, self.display) for x in image_io.to_uint8(images)]
    return image_io.grid_canvas([enlarged[i:i + per_row] for i in range(0, len(enlarged), per_row)])

  def generate(self, *controls):
    """Gradio handler (a generator): status, preview, final grid, strip, PNG, tokens, command."""
    import gradio as gr
    try:
      request = self.batcher.submit(self.request(*controls))
    except (ValueError, BusyError) as e:
      raise gr.Error(str(e), print_exception=False) from None
    start = time.time()
    previews, shown = {}, {}  # t -> images; t -> the PNG of its preview grid already sent
    with self._lock:
      self._count += 1
      out = self.out_dir / f"result_{self._count:05d}"
    out.mkdir(parents=True, exist_ok=True)
    tokens = None
    while tokens is None:
      # Everything that arrived while the last preview was on its way: the sampler never waits
      # for the page, and a slow page (a busy server, a slow link) skips to the newest preview
      # instead of falling behind (the strip below still shows every one).
      updates = [request.updates.get()]
      while not self.all_previews and not request.updates.empty():
        updates.append(request.updates.get())
      latest = None
      for kind, *payload in updates:
        if kind == "error":
          raise gr.Error(payload[0], print_exception=False)
        if kind == "preview":
          previews[payload[0]] = payload[2]
          latest = payload
        else:
          tokens = payload[0]
      if latest is not None and tokens is None:
        t, side, images = latest
        status = f"{t} / {request.num_tokens} tokens: {side} px ({time.time() - start:.1f} s)"
        shown[t] = self.png(self.preview_grid(images), out / f"preview_{t}.png")
        yield status, shown[t], None, None, None, None, ""
    final = previews[tokens.shape[1]]
    final_preview = shown.get(tokens.shape[1]) or self.png(self.preview_grid(final), out / "preview.png")
    per_row = 8  # the sample CLI's default: the PNG is the grid it writes
    grid_rows = [list(final[i:i + per_row]) for i in range(0, len(final), per_row)]
    png = image_io.save_grid(out / "samples.png", grid_rows)
    np.save(out / "tokens.npy", tokens.astype(np.int32))
    counts = sorted(previews)
    strip = image_io.grid_canvas(image_io.coarse_to_fine_strips(lambda t: previews[t][:1], counts,
                                                                self.batcher.image_size))
    command = sample_command(self.tokenizer_src, self.gpt_src, request.labels, request.seed,
                             request.options, request.num_tokens, self.weights)
    status = (f"done: {len(tokens)} image(s), {tokens.shape[1]} tokens, {final.shape[1]} px in "
              f"{time.time() - start:.1f} s")
    yield (status, final_preview, str(png),
           self.png(strip, out / "strip.png"), str(png), str(out / "tokens.npy"), command)

  @staticmethod
  def png(canvas: np.ndarray, path: pathlib.Path) -> str:
    """Writes a uint8 canvas as a fast PNG (zlib level 1) and returns its path: Gradio serves
    the file as it is, instead of encoding the array again on its own (one event loop)."""
    from PIL import Image
    Image.fromarray(canvas).save(path, compress_level=1)
    return str(path)

  def blocks(self):
    import gradio as gr
    cfg = self.batcher.config
    choices = [f"{k}: {name}" for k, name in enumerate(self.names)]
    with gr.Blocks(title="DetailFlow: coarse to fine") as page:
      gr.Markdown("# DetailFlow: watch an image arrive coarse to fine\nEvery prefix of the token "
                  "sequence is an image at the resolution those tokens stand for.")
      with gr.Row():
        with gr.Column(scale=1):
          class_box = gr.Dropdown(choices, value=choices[0], label="class (type to search)",
                                  allow_custom_value=True, filterable=True, elem_id="class")
          num_images = gr.Number(1, precision=0, label=f"number of images (1-{self.batcher.max_batch})",
                                 elem_id="num_images")
          cfg_scale = gr.Slider(0.0, 10.0, value=1.5 if cfg.has_null_class else 1.0, step=0.1,
                                label="CFG scale (> 1: guidance)")
          gradual = gr.Checkbox(False, label="gradual CFG (decays over the groups)")
          temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
          top_k = gr.Number(0, precision=0, label="top-k (0 = off)")
          top_p = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="top-p (1 = off)")
          budget = gr.Number(cfg.block_size, precision=0, label=f"token budget (1-{cfg.block_size})")
          seed = gr.Number(0, precision=0, label="seed")
          button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
          status = gr.Markdown(elem_id="status")
          preview = gr.Image(label="live preview", format="png", elem_id="preview", interactive=False)
          final = gr.Image(label="final grid", format="png", elem_id="final", interactive=False)
          strip = gr.Image(label="coarse to fine (first image)", format="png", interactive=False)
          png = gr.File(label="PNG", elem_id="png")
          tokens = gr.File(label="tokens (.npy)")
          command = gr.Textbox(label="reproduce with", elem_id="command", interactive=False)
      controls = [class_box, num_images, cfg_scale, gradual, temperature, top_k, top_p, budget, seed]
      button.click(self.generate, controls, [status, preview, final, strip, png, tokens, command],
                   api_name="generate", concurrency_limit=None)
    return page

  def launch(self, *, port: int | None = None, share: bool = False, server_name=None,
             inline: bool | None = None, prevent_thread_lock: bool = False):
    page = self.blocks()
    # Gradio's queue only forwards: the handlers wait on the batcher, whose own bound says busy.
    page.queue(max_size=None, default_concurrency_limit=None)
    page.launch(server_name=server_name, server_port=port, share=share, inline=inline,
                prevent_thread_lock=prevent_thread_lock, allowed_paths=[str(self.out_dir)],
                show_error=True, quiet=prevent_thread_lock)
    return page


def build(tokenizer_src, gpt_src, *, tokenizer_weights=None, gpt_weights=None, max_batch=8,
          max_waiting=16, previews: int | None = DEFAULT_PREVIEWS, shapes: bool | None = None,
          warm_up: bool = True,
          all_previews: bool = False) -> App:
  """Loads the models and returns the App (raises FileNotFoundError / ValueError)."""
  from .weights.load import load_gpt, load_tokenizer
  gpt = load_gpt(gpt_src, weights=gpt_weights)
  tokenizer = load_tokenizer(tokenizer_src, weights=tokenizer_weights)
  return build_from_models(gpt, tokenizer, tokenizer_src, gpt_src, tokenizer_weights=tokenizer_weights,
                           gpt_weights=gpt_weights, max_batch=max_batch, max_waiting=max_waiting,
                           previews=previews, shapes=shapes, warm_up=warm_up, all_previews=all_previews)


def build_from_models(gpt, tokenizer, tokenizer_src, gpt_src, *, tokenizer_weights=None,
                      gpt_weights=None, max_batch=8, max_waiting=16,
                      previews: int | None = DEFAULT_PREVIEWS,
                      shapes: bool | None = None, warm_up: bool = True,
                      all_previews: bool = False) -> App:
  """The App over models already loaded (the notebook's); *_src name them in command lines."""
  if gpt.config.vocab_size != tokenizer.config.codebook_size:
    raise ValueError(f"GPT vocabulary ({gpt.config.vocab_size}) does not match the tokenizer "
                     f"codebook ({tokenizer.config.codebook_size})")
  if gpt.config.block_size > tokenizer.config.num_latent_tokens:
    raise ValueError(f"GPT block_size {gpt.config.block_size} exceeds the tokenizer's "
                     f"{tokenizer.config.num_latent_tokens} tokens")
  batcher = StreamingBatcher(gpt, tokenizer, max_batch=max_batch, max_waiting=max_waiting, previews=previews)
  if warm_up:
    batcher.warm_up()
  names = class_names(gpt.config.num_classes, shapes=bool(shapes))
  return App(batcher, names, str(tokenizer_src), str(gpt_src),
             {"tokenizer": tokenizer_weights, "gpt": gpt_weights}, all_previews=all_previews)


def preview_count(text: str) -> int | None:
  """--previews: an integer >= 0, or "all" (None: every decode step)."""
  if text == "all":
    return None
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--previews must be an integer >= 0 or 'all', got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"--previews must be an integer >= 0 or 'all', got {text!r}")
  return value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.app", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokenizer", default=None, help="as `sample --tokenizer` (default: the demo's)")
  parser.add_argument("--gpt", default=None, help="as `sample --gpt` (default: the demo's)")
  parser.add_argument("--tokenizer-weights", choices=["model", "ema"], default=None)
  parser.add_argument("--gpt-weights", choices=["model", "ema"], default=None)
  parser.add_argument("--port", type=int, default=None, help="default: Gradio's (7860 or the next free)")
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the network")
  parser.add_argument("--share", action="store_true", help="a public gradio.live link")
  parser.add_argument("--max-batch", type=int, default=8,
                      help="rows of every sampler call (padded; also the per-request limit)")
  parser.add_argument("--max-waiting", type=int, default=16, help="requests that may wait; more get 'busy'")
  parser.add_argument("--previews", type=preview_count, default=DEFAULT_PREVIEWS,
                      help=f"previews before the final image, at the coarsest resolutions (default "
                      f"{DEFAULT_PREVIEWS}), or 'all': every decode step (each costs a decode)")
  parser.add_argument("--all-previews", action="store_true",
                      help="send every preview, even when the page falls behind (default: the newest)")
  parser.add_argument("--class-names", choices=["auto", "shapes", "ids"], default="auto",
                      help="auto: ImageNet's for 1000 classes, the shapes' for the demo's models")
  args = parser.parse_args(argv)
  demo = args.tokenizer is None and args.gpt is None
  if (args.tokenizer is None) != (args.gpt is None):
    print("error: pass both --tokenizer and --gpt, or neither (the demo's models)", file=sys.stderr)
    return 2
  tokenizer_src, gpt_src = (DEMO_MODELS["tokenizer"], DEMO_MODELS["gpt"]) if demo else (args.tokenizer, args.gpt)
  if demo and not all(p.is_dir() for p in DEMO_MODELS.values()):
    print(NO_MODELS_HINT, file=sys.stderr)
    return 2
  shapes = args.class_names == "shapes" or (args.class_names == "auto" and demo)
  try:
    app = build(tokenizer_src, gpt_src, tokenizer_weights=args.tokenizer_weights,
                gpt_weights=args.gpt_weights, max_batch=args.max_batch, max_waiting=args.max_waiting,
                previews=args.previews, shapes=shapes, all_previews=args.all_previews)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  app.launch(port=args.port, share=args.share, server_name=args.host)
  return 0


if __name__ == "__main__":
  sys.exit(main())
