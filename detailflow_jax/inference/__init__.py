"""Inference on trained models: the compile-once KV-cache sampler (`sampler.py`), the
compile-once tokenizer entry points (`tokenizer.py`), PNG I/O, grids and coarse-to-fine strips
(`images.py`) and loss-curve plots (`plots.py`). Never imports train/, eval/ or a command."""
