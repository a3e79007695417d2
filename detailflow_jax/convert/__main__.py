"""`python -m detailflow_jax.convert {tokenizer,gpt,inception} --checkpoint FILE --out DIR ...`"""
import argparse
import sys

from ..cli import command
from .common import ConversionError
from .gpt import convert_gpt
from .inception import convert_inception
from .tokenizer import convert_tokenizer


@command
def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m detailflow_jax.convert",
      description="Convert a released PyTorch DetailFlow checkpoint, or the Inception weights "
                  "ADM's evaluator uses (.pth or TF .pb), to Orbax.")
  parser.add_argument("model", choices=["tokenizer", "gpt", "inception"])
  parser.add_argument("--checkpoint", required=True,
                      help="RUN/checkpoints/X.pt or .safetensors; for inception a "
                           "pt_inception-2015-12-05-*.pth / weights-inception-2015-12-05-*.pth "
                           "or classify_image_graph_def.pb")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--weights", choices=["model", "ema"], default=None,
                      help="tokenizer/gpt only (default: model)")
  parser.add_argument("--config-dir", default=None,
                      help="tokenizer/gpt only: directory holding config.json/config.yaml "
                           "(default: the run directory)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="tokenizer/gpt only (default: float32)")
  args = parser.parse_args(argv)
  if args.model == "inception":
    given = [f for f, v in (("--weights", args.weights), ("--config-dir", args.config_dir),
                            ("--dtype", args.dtype)) if v is not None]
    if given:
      raise ConversionError(f"{', '.join(given)} do(es) not apply to inception (float32 weights, "
                            "no config files)")
    out = convert_inception(args.checkpoint, args.out)
  else:
    convert = convert_tokenizer if args.model == "tokenizer" else convert_gpt
    out = convert(args.checkpoint, args.out, weights=args.weights or "model",
                  config_dir=args.config_dir, dtype=args.dtype or "float32")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
