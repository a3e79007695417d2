"""The one generation setting the job tests share (10 samples in chunks of 4 on the fixture
GPT, one row per device, CFG on): more samples than a chunk holds, a short last chunk."""
from detailflow_jax.eval.generation import GenerationSettings

SETTINGS = GenerationSettings(num_samples=10, seed=3, label_mode="uniform", cfg_scale=1.5,
                              chunk_size=4, per_device_batch=1)
CLI_ARGS = ["--num-samples", "10", "--seed", "3", "--labels", "uniform", "--cfg-scale", "1.5",
            "--chunk-size", "4", "--per-device-batch", "1"]
