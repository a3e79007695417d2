"""`python -m detailflow_jax.export`: our models and training runs in the PyTorch reference's
released format (or our converted layout).

  python -m detailflow_jax.export --model DIR --out RUN
  python -m detailflow_jax.export --workdir W [--step N] [--weights model|ema] --out RUN
  python -m detailflow_jax.export --workdir W --step N --format model_dir --out DIR

Sources: `--model DIR`, a converted model directory (one set of weights, stored as "model"), or
`--workdir W`, a training run of `launch/train.py` (its `config.json` names the task; the Orbax
train state of step N, default the newest, holds the `model` and, when trained with EMA, the
`ema` weights).

`--format reference` writes, atomically (a temporary directory renamed into place):
  RUN/config.json, RUN/config.yaml   what the reference's load_vq / load_ar_model read
  RUN/siglip2-so400m-patch16-naflex/ tokenizers: the SigLIP2 vision config the reference's
                                     builders take the tower widths from (load with
                                     CACHE_DATA_PATH=RUN; docs/export_reference.md)
  RUN/checkpoints/NAME.pt            torch.save({"model": sd, "ema": sd}) ("ema" when present)
  RUN/checkpoints/NAME.safetensors   one state dict (`--weights`; default: the GPT's ema, the
                                     tokenizer's model, as the reference evaluates), with
                                     metadata naming the producer, source, step and weights
NAME defaults to the step as the reference names checkpoints (0005000) or `model`. The state
dicts are our parameters through the same key tables the converters read them with, so the
converter reads the export back to identical weights.

`--format model_dir` writes one set of weights as our converted directory (`load_gpt(DIR)`).

Tokenizer runs export their inference model: the frozen SigLIP2 teacher and the alignment heads
exist only for training (the trainer's own workdir/export drops them too), so config.json says
repa false and global_token_loss_weight 0.
"""
import argparse
import sys

from .cli import command
from .weights.export import choose_weights, source_from_model_dir, source_from_workdir, write_model_dir, write_reference


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--workdir", help="a training run directory (launch/train.py --workdir)")
  where.add_argument("--model", help="a converted model directory")
  parser.add_argument("--step", type=int, default=None, help="--workdir: the saved step (default: newest)")
  parser.add_argument("--format", choices=["reference", "model_dir"], default="reference")
  parser.add_argument("--weights", choices=["model", "ema"], default=None,
                      help="the weights of the .safetensors file / the model_dir (default: GPT ema, "
                           "tokenizer model, when present); the .pt always holds every set")
  parser.add_argument("--name", default=None, help="checkpoint file name without suffix "
                                                   "(default: the step, 7 digits, or 'model')")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  args = parser.parse_args(argv)
  if args.model and args.step is not None:
    parser.error("--step applies to --workdir")
  source = (source_from_workdir(args.workdir, args.step) if args.workdir
            else source_from_model_dir(args.model))
  chosen = choose_weights(source, args.weights)
  if args.format == "reference":
    out = write_reference(source, args.out, args.weights, args.name)
    print(f"wrote {out}: checkpoints/*.pt with {' + '.join(source.weights)} weights, "
          f".safetensors with the {chosen} weights ({source.kind}, {source.origin})")
  else:
    if args.name:
      parser.error("--name applies to --format reference")
    out = write_model_dir(source, args.out, args.weights)
    print(f"wrote {out} ({source.kind}, {chosen} weights of {source.origin})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
