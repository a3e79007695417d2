"""Pretrained weights that are never optimised (SigLIP2 teacher, DINO backbone, LPIPS VGG16).

They are their own Variable type, so trainers select what to train by type
(`TRAINABLE = All(Param, Not(Frozen))`), not by attribute names a rename would silently break.
`Frozen` subclasses `nnx.Param` so weight loaders and checkpoints that handle parameters keep
handling these too.
"""
from flax import nnx


class Frozen(nnx.Param):
  """A pretrained weight: loaded from a file, never differentiated or updated."""


TRAINABLE = nnx.All(nnx.Param, nnx.Not(Frozen))


def freeze(module: nnx.Module) -> nnx.Module:
  """Turns every plain nnx.Param inside `module` into a Frozen (in place; metadata such as the
  logical sharding axes is kept). Returns `module`."""
  for path, node in list(nnx.iter_graph(module)):
    if type(node) is not nnx.Param:
      continue
    parent = module
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    frozen = Frozen.from_metadata(node.get_value(), node.get_metadata())
    if isinstance(path[-1], int):
      parent[path[-1]] = frozen
    else:
      setattr(parent, path[-1], frozen)
  return module
