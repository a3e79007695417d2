"""PyTorch checkpoint -> Orbax conversion for the released DetailFlow tokenizers and GPTs."""
