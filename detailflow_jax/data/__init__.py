"""Input pipelines (Grain): image sources, token records, procedural shapes, degradation.

Typical use (tokenizer training):
  source = ImageFolderSource("/data/imagenet", "train")
  cfg = ImagePipelineConfig(image_size=256, batch_size=per_process_batch, seed=0,
                            degradation_prob=0.5, correction_training=True, num_workers=8)
  it = image_iterator(source, cfg, tokenizer.schedule)
  batch = global_batch(next(it), mesh)
"""
from .degradation import DynamicResolution, batch_shapes, degrade_batch
from .pipeline import (
                       ImagePipelineConfig,
                       Progress,
                       global_batch,
                       image_dataset,
                       image_iterator,
                       to_iterator,
                       token_dataset,
)
from .sources import ImageFolderSource, ProceduralShapes, TFDSSource, TokenRecordSource, TokenRecordWriter

__all__ = ["DynamicResolution", "batch_shapes", "degrade_batch", "ImagePipelineConfig", "Progress", "global_batch",
           "image_dataset", "image_iterator", "to_iterator", "token_dataset", "ImageFolderSource", "ProceduralShapes",
           "TFDSSource", "TokenRecordSource", "TokenRecordWriter"]
