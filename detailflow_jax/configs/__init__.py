"""The recipes' base configs (ml_collections), shipped with the package.

Run configs stay files loaded by path (`--config=configs/<name>.py[:variant]`, as big_vision and
ml_collections do) and build on these: `from detailflow_jax.configs.gpt_common import gpt_config`.
`demo` holds the embedded demo's settings, so `python -m detailflow_jax.demo` runs from an
installed package anywhere.
"""
