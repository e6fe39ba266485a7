"""Synthetic set: deterministic from the seed, consistent ground truths, batch contract, resume."""
import colorsys
import itertools

import numpy as np
from pycocotools import mask as mask_util
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import synthetic as synthetic_config
from m2f_jax import data
from m2f_jax.data import pipeline
from m2f_jax.data import registry
from m2f_jax.data import synthetic


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = synthetic_config.get_config()
  c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.data.synthetic.update(train_size=12, validation_size=5, image_size=64, seed=3)
  c.data.image_size = (64, 64)
  c.data.eval_pad_size = (64, 64)
  c.data.min_size_test = c.data.max_size_test = 64
  c.data.shuffle_buffer = 8
  c.batch_size = 4
  c.eval.batch_size = 2
  return c


def test_scene_is_deterministic_from_seed():
  a = synthetic.render_scene(np.random.default_rng([0, 0, 5]), 64)
  b = synthetic.render_scene(np.random.default_rng([0, 0, 5]), 64)
  c = synthetic.render_scene(np.random.default_rng([1, 0, 5]), 64)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[2] == b[2]
  assert not np.array_equal(a[0], c[0])


def test_scene_segments_match_index_map():
  for i in range(10):
    _, index_map, segments = synthetic.render_scene(np.random.default_rng([0, 0, i]), 96)
    assert index_map.max() == len(segments)
    for k, s in enumerate(segments):
      assert s["area"] == (index_map == k + 1).sum() > 0
    stuff = [s["category_id"] for s in segments if s["category_id"] >= synthetic.NUM_THINGS]
    assert len(stuff) == len(set(stuff))   # one segment per stuff class


def test_things_take_their_class_hues():
  """Every thing's pixels average to a hue in its class's band (noise and brightness aside)."""
  checked = 0
  for i in range(20):
    image, index_map, segments = synthetic.render_scene(np.random.default_rng([0, 0, i]), 96)
    rgb = image.astype(np.float64) / 255.0
    for k, s in enumerate(segments):
      if s["category_id"] >= synthetic.NUM_THINGS:
        continue
      pixels = rgb[index_map == k + 1]
      hue = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixels])
      mean_hue = np.angle(np.mean(np.exp(2j * np.pi * hue))) / (2 * np.pi)
      offset = (mean_hue - s["category_id"] / synthetic.NUM_THINGS + 0.5) % 1.0 - 0.5
      assert abs(offset) < 0.09, (i, s)  # half band 0.06; bands are 0.2 apart
      checked += 1
  assert checked > 30


def test_default_and_custom_settings_get_their_own_configs():
  default = synthetic_config.get_config()
  assert registry.make_builder(default.data).builder_config.name == "seed0_train2000_val200_128px"
  default.data.synthetic.seed = 7
  assert registry.make_builder(default.data).builder_config.seed == 7
  default.data.synthetic.image_size = 0
  with pytest.raises(ValueError, match="image_size"):
    registry.make_builder(default.data)


def test_builder_stores_the_rendered_scenes(cfg):
  builder = data.get_builder(cfg.data)
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 5
  for ex in builder.as_dataset("validation").as_numpy_iterator():
    i = int(ex["image_id"])
    image, index_map, segments = synthetic.render_scene(np.random.default_rng([3, 1, i]), 64)
    np.testing.assert_array_equal(ex["image"], image)
    np.testing.assert_array_equal(ex["layers"][0, ..., 0], index_map)
    np.testing.assert_array_equal(ex["segments"]["category_id"],
                                  [s["category_id"] for s in segments])


def test_three_ground_truths_agree(cfg):
  info = data.get_dataset_info(cfg.data)
  seen = 0
  for batch in data.eval_iterator(cfg):
    assert batch["image"].shape == (2, 64, 64, 3)
    for real, gt in zip(batch["is_real"], batch["ground_truth"]):
      if not real:
        assert gt["image_id"] == -1
        continue
      seen += 1
      pan, sem = gt["panoptic"], gt["semantic"]
      by_id = {s["id"]: s for s in gt["segments"]}
      assert set(np.unique(pan)) - {0} == set(by_id)
      for sid, s in by_id.items():
        assert np.all(sem[pan == sid] == s["category_id"])
        assert s["area"] == (pan == sid).sum()
        assert s["isthing"] == info.is_thing[s["category_id"]]
      things = [s for s in gt["segments"] if s["isthing"]]
      assert len(gt["instances"]) == len(things)
      for inst, s in zip(gt["instances"], things):
        np.testing.assert_array_equal(mask_util.decode(inst["segmentation"]).astype(bool),
                                      pan == s["id"])
  assert seen == 5


def test_train_batches_follow_the_contract(cfg):
  batch = next(data.train_iterator(cfg))
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 64, 64, 3)
  assert batch["segment_ids"].shape == (4, 1, 64, 64)
  assert batch["labels"].shape == (4, cfg.data.max_targets)
  assert set(batch) == {"image", "valid_hw", "labels", "segment_ids"}
  for labels, ids in zip(batch["labels"], batch["segment_ids"]):
    n = int((labels >= 0).sum())
    assert np.all(labels[:n] >= 0) and np.all(labels[n:] == -1)
    assert np.all(labels[:n] < cfg.model.num_classes)
    assert ids.max() == n
    assert all((ids == m + 1).any() for m in range(n))


def _batches(cfg, start, count):
  return list(itertools.islice(data.train_iterator(cfg, start_step=start), count))


@pytest.mark.parametrize("start", [2, 4])
def test_resume_gives_the_uninterrupted_batches(cfg, start):
  full = _batches(cfg, 0, 7)       # 3 batches per epoch: crosses two epoch boundaries
  resumed = _batches(cfg, start, 7 - start)
  for a, b in zip(full[start:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Epochs differ in order and augmentation.
  assert not np.array_equal(full[0]["image"], full[3]["image"])


def test_every_epoch_reads_the_files_in_a_new_order(tmp_path):
  """Three record files, no shuffle buffer: each epoch is a permutation of the whole split, the
  first two epochs differ, and an epoch's order depends only on (seed, epoch)."""
  c = synthetic_config.get_config()
  c.data.data_dir = str(tmp_path)
  c.data.synthetic.update(train_size=12, validation_size=3, image_size=32, seed=4)
  builder = registry.make_builder(c.data)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=3, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert len(builder.info.splits["train"].file_instructions) == 3

  def epoch_ids(epoch, seed_base=7):
    records = pipeline._epoch_records_fn(builder, "train", seed_base, shuffle_buffer=1)(
        tf.constant(epoch, tf.int64))
    return [int(builder.info.features.deserialize_example(r)["image_id"]) for r in records]

  first, second = epoch_ids(0), epoch_ids(1)
  assert sorted(first) == sorted(second) == list(range(12))
  assert first != second
  assert epoch_ids(1) == second and epoch_ids(1, seed_base=8) != second


def test_processes_read_disjoint_shards(cfg):
  a = next(data.train_iterator(cfg, process_index=0, process_count=2))
  b = next(data.train_iterator(cfg, process_index=1, process_count=2))
  assert a["image"].shape[0] == 2
  assert not np.array_equal(a["image"], b["image"])
