"""ml_collections configs: `--config=configs/<name>.py[:variant]`."""
