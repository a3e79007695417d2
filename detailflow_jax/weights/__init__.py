"""Weights in and out: converted model directories (`model_dir.py`), the one resolver of a
name to a model directory (`hub.py`), `load_tokenizer` / `load_gpt` (`load.py`), a training
run's saved steps and the task registry (`saved_steps.py`), and the writers of the reference's
released format (`export.py`). Never imports train/, eval/ or a command."""
