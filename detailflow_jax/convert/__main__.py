"""`python -m detailflow_jax.convert {tokenizer,gpt} --checkpoint X.pt --out DIR ...`"""
import argparse
import sys

from .common import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.convert",
                                   description="Convert a released PyTorch DetailFlow checkpoint to Orbax.")
  parser.add_argument("model", choices=["tokenizer", "gpt"])
  parser.add_argument("--checkpoint", required=True, help="RUN/checkpoints/X.pt or .safetensors")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--weights", choices=["model", "ema"], default="model")
  parser.add_argument("--config-dir", default=None,
                      help="directory holding config.json/config.yaml (default: the run directory)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args(argv)
  try:
    if args.model == "tokenizer":
      from .tokenizer import convert_tokenizer as convert
    else:
      from .gpt import convert_gpt as convert
    out = convert(args.checkpoint, args.out, weights=args.weights, config_dir=args.config_dir,
                  dtype=args.dtype)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
