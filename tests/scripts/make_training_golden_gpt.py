"""A GPT training golden (golden_gpt.npz, the layout of detailflow_tiny_a/training/README.md)
from the reference's own training code, for a configuration other than A's.

Runs one step of train_c2i.py's loop (generate_z_input_target, the Transformer in train mode,
cross-entropy, backward, clip_grad_norm_, creat_optimizer's fused AdamW, LambdaLR with the
script's lr_lambda, update_ema) twice from the same weights and draws: without token dropout
(`nodrop`) and with it (`tokdrop`). Nothing of the reference is edited or copied: the script's
helpers (generate_z_input_target, creat_optimizer, the lr_lambda nested in main) are compiled
from its source text, and every random draw goes through a tape:

- the module-level name `torch` of autoregressive/models/gpt.py (LabelEmbedder.token_drop's
  torch.rand) and of the compiled generate_z_input_target (the correction torch.rand) is a
  proxy whose `rand` / `randint` record the real draw from the global RNG, or replay one;
- token dropout is torch's nn.Dropout: its kept-mask is read from its output (output != 0,
  checked to equal input * (keep / (1 - p)) exactly) and replayed by that formula.

The self-check rebuilds both steps from the written files alone (gpt.pt, the golden's draws)
with the global RNG re-seeded elsewhere, and requires every array bit-identical and the RNG
state untouched.

  /work/refvenv/bin/python tests/scripts/make_training_golden_gpt.py --ref /work/ref \
      --out tests/fixtures/detailflow_tiny_b

writes OUT/gpt/{config.json, config.yaml, checkpoints/gpt.pt} and
OUT/training/{golden_gpt.npz, README_gpt.md}. `--check` re-runs only the self-check.
"""
import argparse
import ast
import inspect
import json
import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_worker import expose_reference  # noqa: E402

# --- config B -------------------------------------------------------------------------------
# Model (ModelArgs): GQA (6 query heads over 2 kv heads), group 3 with causal_num 6 (two groups
# token-causal), an FFN width from ffn_dim_multiplier / multiple_of, another RoPE base and eps.
MODEL_NAME = "GPT-fixture-b"
DIMS = {"dim": 48, "n_layer": 3, "n_head": 6}
MODEL_ARGS = {"n_kv_head": 2, "multiple_of": 24, "ffn_dim_multiplier": 0.8, "rope_base": 500.0,
              "norm_eps": 1e-6, "class_dropout_prob": 0.25}
CODES = {"codebook_size": 80, "ar_token_num": 36, "group_size": 3, "causal_num": 6}
# train_c2i.py arguments (vars(args) as the script dumps them to config.yaml).
TRAIN_ARGS = {
    "gpt_model": MODEL_NAME, "gpt_type": "c2i", "cls_token_num": 1, "num_classes": 7,
    "dropout_p": 0.1, "token_dropout_p": 0.2, "drop_path_rate": 0.0, "ema": True,
    "learnable_tok_embeddings": True, "lr": 2e-3, "weight_decay": 0.1, "beta1": 0.8,
    "beta2": 0.99, "max_grad_norm": 4.0, "warmup_steps": 0, "warmup_ratio": 0.05,
    "correction_prob": 0.5, "mixed_precision": "none", "global_batch_size": 6, "epochs": 8,
    "global_seed": 0,
}
UPDATES_PER_EPOCH = 5  # len(loader): max_train_steps = epochs x 5 = 40
BATCH = 6
WEIGHT_SEED, DATA_SEED = 2201, 2202
STEP_SEEDS = range(5300, 5400)  # the first giving corrected and plain examples, dropped and kept labels
TOKDROP_SUBSET = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight",
                  "layers.0.attention.wqkv.weight", "layers.1.attention.wo.weight",
                  "layers.2.feed_forward.w1.weight", "layers.0.attention_norm.weight",
                  "norm.weight", "output.weight", "spe_tok_embeddings.special_embeddings.weight")


class Tape:
  """torch.rand / torch.randint through a list: record (real draw, kept) or replay."""

  def __init__(self, torch, replay=None):
    self.torch, self.replay, self.log = torch, replay, []

  def draw(self, fn, *args, **kwargs):
    if self.replay is None:
      value = getattr(self.torch, fn)(*args, **kwargs)
      self.log.append((fn, value.clone()))
      return value
    want, value = self.replay.pop(0)
    assert want == fn, (want, fn)
    return value.clone()


class TorchProxy:
  """The module `torch` with rand / randint taken from a Tape."""

  def __init__(self, torch, tape):
    self._torch, self._tape = torch, tape

  def rand(self, *args, **kwargs):
    return self._tape.draw("rand", *args, **kwargs)

  def randint(self, *args, **kwargs):
    return self._tape.draw("randint", *args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._torch, name)


def script_functions(ref: pathlib.Path, namespace: dict) -> dict:
  """generate_z_input_target, creat_optimizer and main's nested lr_lambda, compiled from
  train_c2i.py's source text into `namespace` (the script itself imports wandb, torchvision)."""
  tree = ast.parse((ref / "autoregressive/train/train_c2i.py").read_text())
  wanted = {"generate_z_input_target", "creat_optimizer"}
  nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
  nodes += [n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n.name == "lr_lambda"]
  assert {n.name for n in nodes} == wanted | {"lr_lambda"}
  out = {}
  for node in nodes:
    module = ast.Module(body=[node], type_ignores=[])
    ns = dict(namespace)
    exec(compile(module, "train_c2i.py", "exec"), ns)
    out[node.name] = ns[node.name]
  return out


class QuietLogger:
  def info(self, *args, **kwargs):
    pass


def build_model(ref_gpt, token_dropout_p: float, dropout_p: float):
  """The GPT as train_c2i.py builds it (GPT_models[gpt_model](...) with the codes' fields)."""
  if MODEL_NAME not in ref_gpt.GPT_models:  # registered as the README of tiny A describes
    ref_gpt.GPT_models[MODEL_NAME] = lambda **kw: ref_gpt.Transformer(ref_gpt.ModelArgs(**DIMS, **MODEL_ARGS, **kw))
  a = TRAIN_ARGS
  return ref_gpt.GPT_models[MODEL_NAME](
      vocab_size=CODES["codebook_size"], block_size=CODES["ar_token_num"], num_classes=a["num_classes"],
      cls_token_num=a["cls_token_num"], model_type=a["gpt_type"], resid_dropout_p=dropout_p,
      ffn_dropout_p=dropout_p, drop_path_rate=a["drop_path_rate"], token_dropout_p=token_dropout_p,
      learnable_tok_embeddings=a["learnable_tok_embeddings"], group_size=CODES["group_size"],
      causal_num=CODES["causal_num"])


def random_weights(model, torch, seed: int) -> dict:
  """Seeded weights: linears N(0, 1/fan_in), embeddings 0.5 N, norm weights 1 + 0.1 N, the
  output layer nonzero (the reference zero-initialises it)."""
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for name, p in model.state_dict().items():
    z = torch.randn(p.shape, generator=gen)
    if name.endswith("norm.weight"):
      out[name] = 1 + 0.1 * z
    elif p.ndim == 2 and "embedding" not in name:
      out[name] = z / math.sqrt(p.shape[1])
    else:
      out[name] = 0.5 * z
  return out


def make_codes(rng, causal_num: int, group_size: int):
  """Synthetic code triples [B, T, 3] = (clean, noisy input, target) shaped like
  extract_codes_c2i's: noisy = clean with the noise span [noise_idx, noise_end) replaced, target =
  clean up to noise_end and re-encoded codes after it (the self-correction extraction's refine)."""
  v, t = CODES["codebook_size"], CODES["ar_token_num"]
  clean = rng.integers(0, v, (BATCH, t))
  noisy, target = clean.copy(), clean.copy()
  spans = np.zeros((BATCH, 2), np.int64)
  for b in range(BATCH):
    raw = int(rng.integers(0, t - group_size))  # get_noise_token_idx(t = T, p = 1)'s rule
    idx = raw if raw < causal_num else raw // group_size * group_size
    end = idx + 1 if idx < causal_num else idx + group_size
    noisy[b, idx:end] = rng.integers(0, v, end - idx)
    changed = rng.random(t - end) < 0.4
    target[b, end:] = np.where(changed, rng.integers(0, v, t - end), clean[b, end:])
    spans[b] = idx, end
  return np.stack([clean, noisy, target], -1).astype(np.int64), spans


def run_step(torch, ref_gpt, fns, weights, ema_weights, codes, labels, case, tape, keep=None, seed=None):
  """One train_c2i step; returns its arrays (golden names without the case prefix) and the
  token-dropout kept-mask (recorded, or the one replayed). Recording seeds the global RNG with
  `seed` once the models are built (their init draws from it); replaying checks that the step
  leaves the global RNG untouched."""
  a = TRAIN_ARGS
  p = a["token_dropout_p"] if case == "tokdrop" else 0.0
  # Residual / FFN dropout 0: their masks are not recorded (as in tiny A).
  model = build_model(ref_gpt, p, 0.0)
  model.load_state_dict(weights)
  ema = build_model(ref_gpt, p, 0.0)
  ema.load_state_dict(ema_weights)
  for q in ema.parameters():
    q.requires_grad_(False)
  optimizer = fns["creat_optimizer"](model, a["weight_decay"], a["lr"], (a["beta1"], a["beta2"]), QuietLogger())
  scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fns["lr_lambda"])
  model.train()
  ema.eval()
  captured = {}
  if p > 0:
    if keep is None:
      def hook(module, inputs, output):
        kept = output != 0
        assert torch.equal(output, inputs[0] * kept.to(output.dtype).div_(1 - p)), "dropout formula"
        captured["keep"] = kept
      model.tok_dropout.register_forward_hook(hook)
    else:
      mask = torch.from_numpy(keep)

      class Replay(torch.nn.Module):
        def forward(self, x):
          captured["keep"] = mask
          return x * mask.to(x.dtype).div_(1 - p)
      model.tok_dropout = Replay()
  if seed is not None:
    torch.manual_seed(seed)
  rng_before = torch.get_rng_state()
  ref_gpt.torch = TorchProxy(torch, tape)
  fns["generate_z_input_target"].__globals__["torch"] = TorchProxy(torch, tape)
  try:
    z_indices = torch.from_numpy(codes).reshape(codes.shape[0], CODES["ar_token_num"], -1)
    z_input, z_target = fns["generate_z_input_target"](z_indices, CODES["group_size"], a["correction_prob"])
    c_indices = torch.from_numpy(labels).reshape(-1)
    drops = []
    original = model.cls_embedding.token_drop

    def token_drop(labels, force_drop_ids=None):
      out = original(labels, force_drop_ids)
      drops.append((out == model.cls_embedding.num_classes).numpy())
      return out
    model.cls_embedding.token_drop = token_drop
    logits, loss = model(cond_idx=c_indices, idx=z_input, targets=z_target)
  finally:
    ref_gpt.torch = torch
  lr_used = optimizer.param_groups[0]["lr"]
  loss.backward()
  grads = {n: q.grad.detach().clone().numpy() for n, q in model.named_parameters()}
  grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a["max_grad_norm"])
  optimizer.step()
  scheduler.step()
  optimizer.zero_grad(set_to_none=True)
  fns["update_ema"](ema, model)
  if tape.replay is not None:
    assert torch.equal(torch.get_rng_state(), rng_before), "a replayed step drew from the global RNG"
  decay_ids = {id(q) for g in optimizer.param_groups if g["weight_decay"] > 0 for q in g["params"]}
  out = {"logits": logits.detach().numpy(), "loss": loss.detach().numpy(), "grad_norm": grad_norm.detach().numpy(),
         "grads": grads, "z_input": z_input.numpy(), "z_target": z_target.numpy(),
         "class_drop": drops[0], "lr_used": np.float64(lr_used),
         "param_names": [n for n, _ in model.named_parameters()],
         "weight_decay": [id(q) in decay_ids for _, q in model.named_parameters()],
         "param_after": {n: q.detach().clone().numpy() for n, q in model.named_parameters()},
         "ema_after": {n: q.detach().clone().numpy() for n, q in ema.named_parameters()}}
  return out, (captured["keep"].numpy() if "keep" in captured else None)


def lr_curve(torch, fns, max_train_steps):
  """LR of updates 0 .. max_train_steps + 1 under LambdaLR(lr_lambda)."""
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=TRAIN_ARGS["lr"])
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=fns["lr_lambda"])
  out = []
  for _ in range(max_train_steps + 2):
    out.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  return np.asarray(out, np.float64)


def setup(ref: pathlib.Path):
  expose_reference(str(ref))
  import torch
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  from autoregressive.models import gpt as ref_gpt
  from utils.ema import update_ema
  max_train_steps = TRAIN_ARGS["epochs"] * UPDATES_PER_EPOCH
  warmup_steps = (TRAIN_ARGS["warmup_steps"] if TRAIN_ARGS["warmup_steps"] is not None
                  else int(TRAIN_ARGS["warmup_ratio"] * max_train_steps))
  fns = script_functions(ref, {"torch": torch, "inspect": inspect, "math": math,
                               "warmup_steps": warmup_steps, "max_train_steps": max_train_steps})
  fns["update_ema"] = update_ema
  return torch, ref_gpt, fns, max_train_steps, warmup_steps


def golden_arrays(torch, ref_gpt, fns, weights, ema_weights, codes, spans, labels, seed, replay=None):
  """Both cases from the same draws: the draws of `seed` (recorded), or `replay` (golden)."""
  g = {}
  tapes = {}
  for case in ("nodrop", "tokdrop"):
    if replay is None:
      tape = Tape(torch)
      keep = None
    else:
      tape = Tape(torch, replay=[("rand", torch.from_numpy(replay["gpt_draw_correction_u"])),
                                 ("rand", torch.from_numpy(replay["gpt_draw_class_u"]))])
      keep = replay["gpt_tokdrop_keep"] if case == "tokdrop" else None
    out, kept = run_step(torch, ref_gpt, fns, weights, ema_weights, codes, labels, case, tape, keep,
                         seed if replay is None else None)
    tapes[case] = tape
    if replay is not None:
      assert not tape.replay, "draws left on the tape"
    assert [fn for fn, _ in tape.log] == (["rand", "rand"] if replay is None else []), tape.log
    g[f"gpt_{case}_logits"] = out["logits"]
    g[f"gpt_{case}_loss"] = out["loss"]
    g[f"gpt_{case}_grad_norm"] = out["grad_norm"]
    if case == "nodrop":
      names = out["param_names"]
      g.update({"gpt_tokens": codes, "gpt_labels": labels, "gpt_noise_spans": spans,
                "gpt_z_input": out["z_input"], "gpt_z_target": out["z_target"],
                "gpt_class_drop": out["class_drop"], "gpt_lr_used": out["lr_used"],
                "gpt_param_names": np.asarray(names), "gpt_param_weight_decay": np.asarray(out["weight_decay"])})
      if replay is None:
        u_corr, u_class = tape.log[0][1].numpy(), tape.log[1][1].numpy()
      else:
        u_corr, u_class = replay["gpt_draw_correction_u"], replay["gpt_draw_class_u"]
      g["gpt_draw_correction_u"] = u_corr
      g["gpt_correction_mask"] = u_corr < TRAIN_ARGS["correction_prob"]
      g["gpt_draw_class_u"] = u_class
      for n in names:
        g[f"gpt_grad/{n}"] = out["grads"][n]
        g[f"gpt_param_after/{n}"] = out["param_after"][n]
        g[f"gpt_ema_after/{n}"] = out["ema_after"][n]
    else:
      g["gpt_tokdrop_keep"] = kept
      for n in TOKDROP_SUBSET:
        g[f"gpt_tokdrop_grad/{n}"] = out["grads"][n]
      # Same draws in both cases (the dropout mask is drawn after them).
      assert np.array_equal(out["z_input"], g["gpt_z_input"]) and np.array_equal(out["class_drop"], g["gpt_class_drop"])
  return g


def check_decisions(g):
  corrected = g["gpt_correction_mask"]
  tokens = g["gpt_tokens"]
  gs = CODES["group_size"]
  want_in = np.where(corrected[:, None], tokens[:, :-gs, 1], tokens[:, :-gs, 0])
  assert np.array_equal(want_in, g["gpt_z_input"])
  assert np.array_equal(g["gpt_class_drop"], g["gpt_draw_class_u"] < MODEL_ARGS["class_dropout_prob"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ref", required=True, help="reference tree (ByteFlow-AI/DetailFlow @ c5f06cd)")
  p.add_argument("--out", required=True, help="fixture directory (writes gpt/ and training/ in it)")
  p.add_argument("--check", action="store_true", help="only re-run the self-check on the written files")
  a = p.parse_args(argv)
  ref, out = pathlib.Path(a.ref), pathlib.Path(a.out)
  torch, ref_gpt, fns, max_train_steps, warmup_steps = setup(ref)
  gpt_dir, train_dir = out / "gpt", out / "training"
  ckpt = gpt_dir / "checkpoints" / "gpt.pt"

  if not a.check:
    import yaml
    model = build_model(ref_gpt, TRAIN_ARGS["token_dropout_p"], TRAIN_ARGS["dropout_p"])
    weights = random_weights(model, torch, WEIGHT_SEED)
    ema_weights = {k: v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(WEIGHT_SEED + 1))
                   for k, v in weights.items()}
    (gpt_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights, "ema": ema_weights}, ckpt)
    # config.json: the run's ModelArgs as model.save_config writes it (dropout at the run's 0.1).
    (gpt_dir / "config.json").write_text(json.dumps(model.config.__dict__, indent=4))
    config_yaml = dict(TRAIN_ARGS, gpt_model_dims=DIMS, image_size=64)
    (gpt_dir / "config.yaml").write_text(
        f"# '{MODEL_NAME}' is not a key of the reference's GPT_models; load_ar_model needs it registered as\n"
        "# Transformer(ModelArgs(**gpt_model_dims, **rest_of_config_json)). Written by\n"
        "# tests/scripts/make_training_golden_gpt.py (train_c2i.py's arguments of the golden step).\n"
        + yaml.safe_dump(config_yaml, sort_keys=False))
    rng = np.random.default_rng(DATA_SEED)
    codes, spans = make_codes(rng, CODES["causal_num"], CODES["group_size"])
    labels = rng.integers(0, TRAIN_ARGS["num_classes"], BATCH).astype(np.int64)
    for seed in STEP_SEEDS:
      torch.manual_seed(seed)
      u_corr, u_class = torch.rand(BATCH).numpy(), torch.rand(BATCH).numpy()
      corr, drop = u_corr < TRAIN_ARGS["correction_prob"], u_class < MODEL_ARGS["class_dropout_prob"]
      if corr.any() and not corr.all() and drop.any() and not drop.all():
        break
    g = golden_arrays(torch, ref_gpt, fns, weights, ema_weights, codes, spans, labels, seed)
    g["sched_gpt_lr"] = lr_curve(torch, fns, max_train_steps)
    g["sched_gpt_points"] = np.asarray([0, 1, warmup_steps, max_train_steps // 2, max_train_steps - 1,
                                        max_train_steps], np.int64)
    start_ratio, end_ratio = fns["lr_lambda"].__defaults__
    g["sched_gpt_params"] = np.asarray([TRAIN_ARGS["lr"], max_train_steps, warmup_steps, start_ratio, end_ratio],
                                       np.float64)
    assert g["sched_gpt_lr"][0] == g["gpt_lr_used"]
    check_decisions(g)
    np.savez_compressed(train_dir / "golden_gpt.npz", **g)
    print(f"seed {seed}: corrected {g['gpt_correction_mask']}, dropped {g['gpt_class_drop']}, "
          f"loss {float(g['gpt_nodrop_loss']):.6f} / {float(g['gpt_tokdrop_loss']):.6f}, grad norm "
          f"{float(g['gpt_nodrop_grad_norm']):.4f} / {float(g['gpt_tokdrop_grad_norm']):.4f}")

  # Self-check: everything again from the files, draws from the golden, RNG elsewhere.
  with np.load(train_dir / "golden_gpt.npz", allow_pickle=False) as z:
    golden = {k: z[k] for k in z.files}
  state = torch.load(ckpt, weights_only=True)
  torch.manual_seed(12345)
  again = golden_arrays(torch, ref_gpt, fns, state["model"], state["ema"], golden["gpt_tokens"],
                        golden["gpt_noise_spans"], golden["gpt_labels"], None, replay=golden)
  again["sched_gpt_lr"] = lr_curve(torch, fns, max_train_steps)
  for k in ("sched_gpt_points", "sched_gpt_params"):
    again[k] = golden[k]
  assert set(again) == set(golden), set(again) ^ set(golden)
  for k in golden:
    assert golden[k].dtype == again[k].dtype and np.array_equal(golden[k], again[k]), k
  check_decisions(golden)
  size = (train_dir / "golden_gpt.npz").stat().st_size
  print(f"PASS: {len(golden)} arrays bit-identical on replay; global RNG untouched by each replayed step; golden_gpt.npz {size} bytes, "
        f"gpt.pt {ckpt.stat().st_size} bytes")


if __name__ == "__main__":
  main()
