"""The embedded end-to-end demo (`python -m detailflow_jax.demo`): `run.py` trains, samples and
measures on the procedural shapes; `judge.py` is the small CNN that grades what it made."""
