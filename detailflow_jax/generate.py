"""`python -m detailflow_jax.generate`: N class-conditional samples as an ADM batch file, on
every local device, resumable, optionally scored.

  python -m detailflow_jax.generate --tokenizer DIR --gpt DIR --num-samples 50000 \
      --out samples.npz [--seed 0 | --seeds 0,1,2] [--labels uniform|balanced] [--cfg-scale 1.45] \
      [--gradual-cfg] [--image-size 256] [--eval-image-size 256] [--vq-weights model|ema] \
      [--workdir CHUNKS] [--precision bfloat16] [--reference REF.npz --inception DIR]

Every option of the reference's autoregressive/sample/sample_c2i_ddp.py has one here
(docs/evaluation_reference.md has the table). --image-size is the decode side (one of the
tokenizer's best decode resolutions; the decode uses min(GPT tokens, the tokenizer table's
budget for that side)); --eval-image-size resizes the decodes with torch's bicubic before
uint8, as the reference does.

Sample i's label and key are pure functions of (seed, i) (detailflow_jax/data/protocol.py), so
the file is the same on any number of devices. Chunks of finished samples go to --workdir
(default: OUT's name + '.chunks'; local or gs://); a rerun after a kill resumes there. The output holds
`arr_0` uint8 [N, H, W, 3] and `arr_1` int32 labels [N]; `results.json` (next to the chunks)
records the protocol, weight hashes, package versions and, with --reference/--inception, IS,
FID, sFID, precision and recall (mean ± std over --seeds). Pods and clusters:
launch/evaluate.py with a `:eval` config.
"""
import argparse
import sys

from . import paths
from .cli import add_compile_cache_flags, command, int_list, use_compile_cache
from .data.protocol import LABEL_MODES
from .eval.generation import CFG_INTERVAL_NOTE, GenerationSettings, run_generation
from .weights.hub import add_model_flags, cache_root


@command
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m detailflow_jax.generate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(parser, "tokenizer", "--tokenizer", "--vq-weights", weights_default="model",
                  weights_help="of a released checkpoint (default: model, the reference's "
                               "use_vq_ema=False); converted directories hold one set")
  add_model_flags(parser, "GPT", "--gpt", "--gpt-weights", weights_default="ema",
                  weights_help="of a released checkpoint (default: ema, as the reference evaluates: "
                               "use_gpt_ema); converted directories hold one set")
  parser.add_argument("--num-samples", type=int, required=True)
  parser.add_argument("--out", required=True, help="output .npz (arr_0 images, arr_1 labels)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeds", default=None, help="several seeds, e.g. 0,1,2: one file each, mean ± std")
  parser.add_argument("--labels", choices=LABEL_MODES, default="uniform",
                      help="uniform: i.i.d. uniform classes (the reference's); balanced: N/C per class")
  parser.add_argument("--cfg-scale", type=float, default=1.5)
  parser.add_argument("--gradual-cfg", action="store_true",
                      help="guidance decays over groups: scale * (G - i + 1) / (G + 1) (the "
                           "reference's --gradual_cfg)")
  parser.add_argument("--cfg-interval", type=int, default=-1, help=CFG_INTERVAL_NOTE)
  parser.add_argument("--image-size", type=int, default=0,
                      help="decode side (default: the tokenizer's image_size); one of the "
                           "tokenizer's best decode resolutions, which sets the token budget")
  parser.add_argument("--eval-image-size", type=int, default=0,
                      help="side of the stored images (default: --image-size); decodes of "
                           "another side are resized with torch's bicubic before uint8")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top-k", type=int, default=0, help="0 = off (the paper's setting)")
  parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off (the paper's setting)")
  parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                      help="bfloat16: every GPT and tokenizer weight and activation in bf16")
  parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="GPT matmul weights under --precision float32: bfloat16 is weight-only "
                           "(float32 activations, KV cache and logits; docs/latency.md)")
  parser.add_argument("--per-device-batch", type=int, default=4)
  parser.add_argument("--chunk-size", type=int, default=1000)
  parser.add_argument("--workdir", default=None,
                      help="chunks + results.json, local or gs:// (default: OUT.chunks)")
  parser.add_argument("--png-dir", default=None, help="also write every sample as NNNNNN.png (local or gs://)")
  parser.add_argument("--reference", default=None, help="ADM reference batch .npz (to score)")
  parser.add_argument("--inception", default=None, help="converted Inception directory (to score)")
  parser.add_argument("--inception-batch", type=int, default=256)
  add_compile_cache_flags(parser)
  args = parser.parse_args(argv)
  use_compile_cache(args, cache_root())
  seeds = int_list(args.seeds, "--seeds", low=0, distinct=True) if args.seeds else [args.seed]
  settings = GenerationSettings(
      num_samples=args.num_samples, seed=seeds[0], label_mode=args.labels,
      cfg_scale=args.cfg_scale, gradual_cfg=args.gradual_cfg, cfg_interval=args.cfg_interval,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
      precision=args.precision, weights_dtype=args.weights_dtype, image_size=args.image_size,
      eval_image_size=args.eval_image_size,
      per_device_batch=args.per_device_batch, chunk_size=args.chunk_size)
  out = paths.run_path(args.out)
  workdir = paths.run_path(args.workdir) if args.workdir else out.with_name(out.name + ".chunks")
  results = run_generation(args.tokenizer, args.gpt, settings, seeds=seeds, workdir=workdir, out=out,
                           reference=args.reference, inception=args.inception,
                           gpt_weights=args.gpt_weights, vq_weights=args.vq_weights,
                           png_dir=args.png_dir, inception_batch=args.inception_batch)
  for run in results["runs"]:
    print(f"seed {run['seed']}: {run['samples']} ({run['summary']['images_made']} new images, "
          f"{run['summary']['images_per_second'] or 0:.2f} img/s)")
  for k, v in results.get("scores", {}).items():
    print(f"{k}: {v['mean']} ± {v['std']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
