"""Flax NNX modules: the SigLIP2-style ViT tokenizer, the class-conditional GPT, and the frozen
networks tokenizer training uses. Parameters carry logical axis names ('embed', 'mlp', 'heads',
'vocab', ...) as metadata only (`sharding.logical_axes`); nothing here needs a mesh."""
