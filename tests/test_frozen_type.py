"""Frozen weights are selected by Variable type: a renamed attribute cannot make a pretrained
network trainable (the trainer's old filter matched the names `repa_model` / `backbone`)."""
import dataclasses

import jax
from flax import nnx

from detailflow_jax.models.dino import DinoConfig, DinoDiscriminator
from detailflow_jax.models.frozen import Frozen
from detailflow_jax.models.lpips import LPIPS
from detailflow_jax.models.tokenizer import Teacher, Tokenizer, TokenizerConfig
from detailflow_jax.models.vit import ViTConfig
from detailflow_jax.train.tokenizer import split_trainable

TOWER = ViTConfig(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, position_grid=2, patch_size=8)
DINO = DinoConfig(hidden_size=16, num_heads=2, mlp_dim=32, depth=2, image_size=32, key_depths=(0, 1))


class Renamed(nnx.Module):
  """Pretrained networks held under names no name filter knows, beside one trainable layer."""

  def __init__(self):
    self.siglip = Teacher(TOWER, rngs=nnx.Rngs(0))
    self.dino_disc = DinoDiscriminator(DINO, rngs=nnx.Rngs(1))
    self.perceptual_net = LPIPS((4, 4, 4, 4, 4), rngs=nnx.Rngs(2))
    self.head = nnx.Linear(4, 4, rngs=nnx.Rngs(3))


def _paths(state):
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def test_renamed_frozen_networks_stay_frozen():
  model = nnx.eval_shape(Renamed)
  _, trainable, frozen, _ = split_trainable(model)
  trainable_paths = _paths(trainable)
  # Only the plain layer and the DINO discriminator's heads train.
  assert trainable_paths and all(p.startswith(("head/", "dino_disc/heads/")) for p in trainable_paths)
  for prefix in ("siglip/", "dino_disc/backbone/", "perceptual_net/"):
    assert any(p.startswith(prefix) for p in _paths(frozen)), prefix
  # Every weight of the three pretrained networks is Frozen, none is left a plain Param.
  for net in (model.siglip, model.dino_disc.backbone, model.perceptual_net):
    leaves = [v for _, v in nnx.to_flat_state(nnx.state(net, nnx.Param))]
    assert leaves and all(type(v) is Frozen for v in leaves)


def test_tokenizer_teacher_is_frozen_by_type():
  cfg = TokenizerConfig(encoder=TOWER, decoder=dataclasses.replace(TOWER, patch_embedding=False),
                        teacher=TOWER, image_size=16, max_image_size=16, min_image_size=16,
                        num_latent_tokens=4, group_size=2, codebook_size=8, codebook_embed_dim=4,
                        global_token_loss_weight=1.0, global_token_hidden=8)
  model = nnx.eval_shape(lambda: Tokenizer(cfg, rngs=0))
  _, trainable, frozen, _ = split_trainable(model)
  teacher = _paths(nnx.state(model.repa_model))
  assert teacher and {"repa_model/" + p for p in teacher} == _paths(frozen)
  assert not any(p.startswith("repa_model/") for p in _paths(trainable))
  assert any(p.startswith("global_token_proj/") for p in _paths(trainable))
  n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  n_split = sum(x.size for x in jax.tree.leaves(trainable)) + sum(x.size for x in jax.tree.leaves(frozen))
  assert n_all == n_split
