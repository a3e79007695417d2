"""Sources: ImageNet folder (made here), TFDS mock, token records, procedural shapes; bad input."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from detailflow_jax.data.pipeline import ImagePipelineConfig, image_dataset, to_iterator, token_dataset
from detailflow_jax.data.sources import (ImageFolderSource, ProceduralShapes, TFDSSource, TokenRecordSource,
                                         TokenRecordWriter, class_shape_colour)
from detailflow_jax.data.transforms import decode_image


def _jpeg(rng, size=(50, 40), mode="RGB", fmt="JPEG"):
  arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
  img = Image.fromarray(arr).convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture()
def imagenet_tree(tmp_path):
  """train/<wnid>/*.JPEG with every kind of bad file the issue lists."""
  rng = np.random.default_rng(0)
  root = tmp_path / "imagenet"
  for wnid in ("n02", "n01", "n03"):
    d = root / "train" / wnid
    d.mkdir(parents=True)
    for i in range(4):
      (d / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rng))
  (root / "train" / "n04_empty").mkdir()
  bad = root / "train" / "n01"
  good = _jpeg(rng)
  (bad / "truncated.JPEG").write_bytes(good[: len(good) // 3])
  (bad / "garbage.JPEG").write_bytes(b"not an image at all")
  (bad / "cmyk.JPEG").write_bytes(_jpeg(rng, mode="CMYK"))
  (bad / "gray.JPEG").write_bytes(_jpeg(rng, mode="L"))
  (bad / "png_named.JPEG").write_bytes(_jpeg(rng, fmt="PNG"))
  (bad / "tiny.JPEG").write_bytes(_jpeg(rng, size=(5, 3)))
  unreadable = bad / "unreadable.JPEG"
  unreadable.write_bytes(_jpeg(rng))
  unreadable.chmod(0)
  return root


def test_image_folder_labels_and_cache(imagenet_tree, tmp_path):
  src = ImageFolderSource(imagenet_tree, "train", cache_dir=tmp_path / "cache")
  assert src.classes == ["n01", "n02", "n03", "n04_empty"]
  assert len(src) == 12 + 7
  rec = src[src.files.index("n02/n02_0.JPEG")]
  assert rec["label"] == 1 and rec["image"][:2] == b"\xff\xd8"
  assert src.index_path.is_file()
  again = ImageFolderSource(imagenet_tree, "train", cache_dir=tmp_path / "cache")
  assert again.files == src.files


def test_bad_inputs_are_converted_or_replaced(imagenet_tree, tmp_path, caplog):
  src = ImageFolderSource(imagenet_tree, "train", cache_dir=tmp_path / "cache")
  import os
  running_as_root = os.geteuid() == 0  # root reads files whatever their mode
  for name in ("cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "tiny.JPEG"):
    img = decode_image(src[src.files.index(f"n01/{name}")]["image"], name)
    assert img is not None and img.mode == "RGB", name
  with caplog.at_level(logging.WARNING, logger="detailflow_jax"):
    for name in ("truncated.JPEG", "garbage.JPEG"):
      assert decode_image(src[src.files.index(f"n01/{name}")]["image"], name) is None
  assert "truncated.JPEG" in caplog.text and "garbage.JPEG" in caplog.text
  cfg = ImagePipelineConfig(image_size=16, batch_size=len(src), train=False, num_epochs=1)
  with caplog.at_level(logging.WARNING, logger="detailflow_jax"):
    batch = next(to_iterator(image_dataset(src, cfg)))
  assert batch["image"].shape == (len(src), 16, 16, 3)
  assert np.all(np.abs(batch["image"]) <= 1.0)
  assert int(batch["skipped"].sum()) == 2 + (0 if running_as_root else 1)  # replaced, counted


def test_missing_or_empty_roots_fail_at_start(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ImageFolderSource(tmp_path / "nope")
  (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no images"):
    ImageFolderSource(tmp_path / "empty", cache_dir=tmp_path / "cache")


def test_tfds_source_under_mock():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    src = TFDSSource("imagenet2012", "train")
    assert len(src) == 6
    cfg = ImagePipelineConfig(image_size=32, batch_size=3, train=True, num_epochs=1)
    batch = next(to_iterator(image_dataset(src, cfg)))
  assert batch["image"].shape == (3, 32, 32, 3) and batch["label"].shape == (3,)
  assert int(batch["skipped"].sum()) == 0


def test_token_records_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  triples = rng.integers(0, 64, size=(10, 32, 3))
  for shard in range(2):
    w = TokenRecordWriter(tmp_path, shard=shard)
    for i in range(5):
      w.write(triples[shard * 5 + i], label=shard * 5 + i)
    assert w.close().name == f"tokens-{shard:05d}.array_record"
  src = TokenRecordSource(tmp_path)
  assert len(src) == 10
  np.testing.assert_array_equal(src[7]["tokens"], triples[7])
  assert src[7]["label"] == 7
  batches = list(to_iterator(token_dataset(src, batch_size=5, shuffle=False, num_epochs=1)))
  assert len(batches) == 2 and batches[0]["tokens"].shape == (5, 32, 3)
  np.testing.assert_array_equal(batches[1]["labels"], np.arange(5, 10))
  with pytest.raises(FileNotFoundError):
    TokenRecordSource(tmp_path / "missing")


def test_procedural_shapes_are_deterministic_and_class_coded():
  src = ProceduralShapes(num_classes=10, image_size=48, size=50, seed=3)
  a, b = src[7], src[7]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (48, 48, 3) and a["image"].dtype == np.uint8
  labels = {src[i]["label"] for i in range(50)}
  assert labels == set(range(10))
  pairs = {(class_shape_colour(c)[0], tuple(class_shape_colour(c)[1])) for c in range(64)}
  assert len(pairs) == 64
  # The class colour is the most common saturated colour in the image.
  img = src[7]["image"].reshape(-1, 3).astype(np.float32)
  colour = class_shape_colour(src[7]["label"])[1]
  close = np.linalg.norm(img / np.linalg.norm(img, axis=1, keepdims=True).clip(1) -
                         colour / np.linalg.norm(colour), axis=1) < 0.05
  assert close.mean() > 0.05
