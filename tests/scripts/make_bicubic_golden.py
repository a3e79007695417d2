"""Writes tests/fixtures/bicubic_torch_golden.npz: torch's F.interpolate(mode='bicubic') as the
reference's sample_c2i_ddp.py / reconstruct_vq.py call it (align_corners left at its default,
False; a = -0.75), on float32 NCHW decodes about [-1, 1]. Run by hand with torch installed:

  python tests/scripts/make_bicubic_golden.py

Keys: in_{name} float32 NHWC inputs, out_{name} float32 NHWC torch outputs, torch_version.
"""
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

CASES = {  # name: (input N, H, W), output (H, W)
    "down64to48": ((2, 64, 64), (48, 48)),   # a 64-side decode stored at 48
    "up40to64": ((2, 40, 40), (64, 64)),
    "down128to112": ((1, 128, 128), (112, 112)),
    "rect17x23to31x12": ((1, 17, 23), (31, 12)),
}


def main():
  rng = np.random.default_rng(20261206)
  out = {"torch_version": np.array(torch.__version__)}
  for name, ((n, h, w), size) in CASES.items():
    x = np.tanh(rng.normal(0, 0.8, (n, 3, h, w))).astype(np.float32)  # decodes overshoot [-1, 1] a little
    x *= np.float32(1.05)
    y = F.interpolate(torch.from_numpy(x), size=size, mode="bicubic").numpy()
    out[f"in_{name}"] = x.transpose(0, 2, 3, 1)
    out[f"out_{name}"] = y.transpose(0, 2, 3, 1)
  path = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "bicubic_torch_golden.npz"
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
