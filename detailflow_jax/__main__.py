"""`python -m detailflow_jax [--workdir DIR]`: the embedded default run.

Converts the tiny reference checkpoints that ship with the repository (tests/fixtures, produced
by running the PyTorch reference) and writes what they can show: a coarse-to-fine
reconstruction strip of the bundled images and, from the GPT, class-conditional samples decoded
after every group. Everything runs on CPU in well under a minute.
"""
import argparse
import pathlib
import shutil
import sys
import time

from .cli import command

# The fixtures ship with the checkout (beside the package), not inside the installed package.
FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "detailflow_tiny_a"


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax", description=__doc__)
  parser.add_argument("--workdir", default="detailflow_quickstart")
  parser.add_argument("--fixture", default=str(FIXTURE),
                      help="a run directory tree in the released layout (tokenizer/, gpt/, images/); "
                      "default: the checkout's tiny fixture")
  args = parser.parse_args(argv)
  fixture = pathlib.Path(args.fixture)
  if not (fixture / "tokenizer" / "checkpoints").is_dir():
    raise FileNotFoundError(f"no tokenizer checkpoint under {fixture.absolute()}/tokenizer/checkpoints "
                            "(the fixture ships with the git checkout: pass --fixture DIR)")
  workdir = pathlib.Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)

  from . import reconstruct
  from .convert.tokenizer import convert_tokenizer

  start = time.time()
  tok_dir = workdir / "tokenizer"
  if tok_dir.exists():
    shutil.rmtree(tok_dir)
  print(f"[1/3] converting {fixture / 'tokenizer'} -> {tok_dir}", flush=True)
  convert_tokenizer(next((fixture / "tokenizer" / "checkpoints").glob("*.pt")), tok_dir)

  images = sorted(str(p) for p in (fixture / "images").glob("input_*.png"))
  print(f"[2/3] coarse-to-fine reconstructions of {len(images)} image(s)", flush=True)
  code = reconstruct.main(["--tokenizer", str(tok_dir), "--images", *images,
                           "--out", str(workdir / "reconstruction_strip.png")])
  if code:
    return code

  gpt_ckpts = sorted((fixture / "gpt" / "checkpoints").glob("*.pt"))
  if gpt_ckpts:
    from . import sample
    from .convert.gpt import convert_gpt
    gpt_dir = workdir / "gpt"
    if gpt_dir.exists():
      shutil.rmtree(gpt_dir)
    print("[3/3] converting the GPT and sampling classes 0-3", flush=True)
    convert_gpt(gpt_ckpts[0], gpt_dir)
    code = sample.main(["--tokenizer", str(tok_dir), "--gpt", str(gpt_dir), "--labels", "0,1,2,3",
                        "--cfg-scale", "1.5", "--seed", "0",
                        "--progressive", str(workdir / "samples_coarse_to_fine.png"),
                        "--out", str(workdir / "samples.png")])
    if code:
      return code
  print(f"done in {time.time() - start:.1f}s; PNGs are in {workdir}\n"
        "(the bundled checkpoints hold random weights made to test numerics, so the images show "
        "structure, not objects)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
