"""Flax NNX modules: the SigLIP2-style ViT tokenizer and the class-conditional GPT.

Parameters carry logical axis names ('embed', 'mlp', 'heads', 'vocab', ...) as metadata only.
Flax 0.12 would otherwise shard a variable eagerly at creation and demand a mesh; we instead
map the names to mesh axes with one rules table when the train state is created (init by
abstract shapes, then jit with out_shardings), so eager sharding is switched off here.
"""
from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
