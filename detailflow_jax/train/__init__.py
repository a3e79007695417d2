"""Training: the one run driver (`driver`) both recipes hand their pieces to, the recipes
themselves (`ar`, `tokenizer` with `gan` and `frozen_nets`), the sharded train state and step
(`state`), optimizer, loop, checkpoints, metric writers, fine-tuning starts (`init_from`) and
code extraction (`extract`). The mesh and the sharding rules live in `detailflow_jax/sharding.py`."""
