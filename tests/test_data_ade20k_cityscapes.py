"""ADE20K semantic and Cityscapes builders on miniature official-layout files, and the
ADE20K-style augmentation (resize, crop, colour jitter, flip, pad)."""
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import ade20k_semantic_r50
from configs import cityscapes_instance_r50
from configs import cityscapes_panoptic_r50
from m2f_jax import data
from m2f_jax.data import transforms

H, W = 32, 64


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _rgb(seed):
  return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _small(cfg, root, tmp):
  cfg.data.update(manual_dir=root, data_dir=tmp, augment="none", image_size=(32, 64),
                  eval_pad_size=(32, 64), min_size_test=32, max_size_test=64, max_targets=8)
  cfg.batch_size = cfg.eval.batch_size = 1
  return cfg


@pytest.fixture(scope="module")
def ade_cfg(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ade"))
  label = np.zeros((H, W), np.uint8)      # 0 = ignore
  label[:16] = 1                          # wall -> class 0
  label[16:, 32:] = 5                     # tree -> class 4
  for folder, name in (("training", "ADE_train_00000007"), ("validation", "ADE_val_00000009")):
    base = os.path.join(root, "ADEChallengeData2016")
    Image.fromarray(_rgb(1)).save(_path(base, "images", folder, name + ".jpg"))
    _save(_path(base, "annotations", folder, name + ".png"), label)
  return _small(ade20k_semantic_r50.get_config(), root, str(tmp_path_factory.mktemp("tfds")))


def _path(*parts):
  os.makedirs(os.path.join(*parts[:-1]), exist_ok=True)
  return os.path.join(*parts)


def test_ade20k_semantic_targets_and_ignore(ade_cfg):
  batch = next(data.train_iterator(ade_cfg))
  labels, ids = batch["labels"][0], batch["segment_ids"][0, 0]
  assert labels.tolist()[:3] == [0, 4, -1]
  assert np.all(ids[:16] == 1) and np.all(ids[16:, 32:] == 2) and np.all(ids[16:, :32] == 0)
  gt = next(data.eval_iterator(ade_cfg))["ground_truth"][0]
  assert gt["image_id"] == 9 and set(gt) == {"image_id", "semantic"}
  assert gt["semantic"][0, 0] == 0 and gt["semantic"][20, 40] == 4 and gt["semantic"][20, 0] == 255


def test_ade20k_augmentation_shapes_and_padding():
  image = tf.constant(np.full((60, 90, 3), 77, np.uint8))
  layers = tf.constant(np.ones((1, 60, 90), np.int32))
  lut = tf.constant([-1, 0])
  for seed in range(4):
    out, out_layers, valid = transforms.semantic_style_augment(
        image, layers, tf.constant([seed, 1]), (64, 64), (32, 48), 2048, lut, 1.0)
    valid = valid.numpy()
    assert out.shape == (64, 64, 3) and out_layers.shape == (1, 64, 64)
    assert (valid[0], valid[1]) in ((32, 48), (48, 64))
    assert np.all(out.numpy()[valid[0]:] == 128) and np.all(out_layers.numpy()[0, valid[0]:] == 0)
    assert np.all(out_layers.numpy()[0, :valid[0], :valid[1]] == 1)
    assert np.all(out_layers.numpy()[0, :, valid[1]:] == 0)


def test_category_area_crop_avoids_one_class_crops():
  layers = np.ones((1, 64, 64), np.int32)
  layers[0, :, 48:] = 2                    # class 1 only on the right quarter
  out_ok = 0
  for seed in range(8):
    _, out_layers = transforms.random_crop_category_area(
        tf.zeros((64, 64, 3), tf.uint8), tf.constant(layers), tf.constant([seed, 2]), (32, 32),
        tf.constant([-1, 0, 1]), 0.9)
    out_ok += int(len(np.unique(out_layers.numpy())) == 2)
  assert out_ok >= 6      # almost all crops hold both classes (10 tries each)


def _write_cityscapes(root):
  labels = np.full((H, W), 7, np.uint8)          # road
  labels[:8] = 23                                # sky
  instances = labels.astype(np.uint16).copy()
  instances[10:20, 5:20] = 26001                 # car instance
  instances[10:20, 30:40] = 26                   # car group: crowd
  instances[22:30, 45:60] = 29000                # caravan: ignored in evaluation
  labels[10:20, 5:20] = labels[10:20, 30:40] = 26
  labels[22:30, 45:60] = 29
  for split in ("train", "val"):
    stem = os.path.join(split, "aachen", "aachen_000000_000019")
    _save(os.path.join(root, "leftImg8bit", stem + "_leftImg8bit.png"), _rgb(2))
    _save(os.path.join(root, "gtFine", stem + "_gtFine_labelIds.png"), labels)
    _save(os.path.join(root, "gtFine", stem + "_gtFine_instanceIds.png"), instances)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cityscapes"))
  _write_cityscapes(root)
  return root


def test_cityscapes_panoptic(cityscapes_root, tmp_path_factory):
  cfg = _small(cityscapes_panoptic_r50.get_config(), cityscapes_root,
               str(tmp_path_factory.mktemp("tfds")))
  batch = next(data.train_iterator(cfg))
  assert sorted(batch["labels"][0][batch["labels"][0] >= 0].tolist()) == [0, 10, 13]
  gt = next(data.eval_iterator(cfg))["ground_truth"][0]
  by_id = {s["id"]: s for s in gt["segments"]}
  assert set(by_id) == {7, 23, 26001, 26}
  assert by_id[26]["iscrowd"] == 1 and by_id[26001]["category_id"] == 13
  assert gt["panoptic"][25, 50] == 0 and gt["semantic"][25, 50] == 255   # caravan: void
  assert gt["semantic"][0, 0] == 10


def test_cityscapes_instance(cityscapes_root, tmp_path_factory):
  cfg = _small(cityscapes_instance_r50.get_config(), cityscapes_root,
               str(tmp_path_factory.mktemp("tfds")))
  gt = next(data.eval_iterator(cfg))["ground_truth"][0]
  assert [(i["category_id"], i["iscrowd"]) for i in gt["instances"]] == [(2, 1), (2, 0)]
  assert data.get_dataset_info(cfg.data).class_names[2] == "car"
