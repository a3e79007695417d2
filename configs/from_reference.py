"""A tokenizer run from the reference's training YAML: `--config=configs/from_reference.py:PATH.yaml`.

The YAML is train_tokenizer.py's --config file (e.g. the reference's
configs/vq_8k_siglip_b_res_p02_pw15_enc.yaml plus the README's command-line values written into
it); detailflow_jax/convert/training_yaml.py maps it key by key (unknown or unsupported keys are
errors naming them). Weight files and data are set as usual: --config.weights.*, --config.data.*.
"""
import pathlib

import yaml

from detailflow_jax.convert.common import ConversionError
from detailflow_jax.convert.training_yaml import tokenizer_run_config


def get_config(path: str = ""):
  if not path:
    raise ValueError("configs/from_reference.py needs the YAML's path: "
                     "--config=configs/from_reference.py:path/to/vq.yaml")
  p = pathlib.Path(path)
  if not p.is_file():
    raise ConversionError(f"training YAML not found: {p}")
  return tokenizer_run_config(yaml.safe_load(p.read_text()) or {}, where=str(p))
