"""COCO builders on miniature files in the official layout: panoptic ids, crowd, void, polygons,
RLE, overlapping instances in two layers, bad data, and the LSJ transform."""
import json
import logging
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
import pytest
import tensorflow as tf

from configs import coco_instance_r50
from configs import coco_panoptic_r50
from m2f_jax import data
from m2f_jax.data import categories
from m2f_jax.data import coco
from m2f_jax.data import transforms

H, W = 48, 64
PERSON, CAR, SKY = 1, 3, 187            # original COCO ids
PERSON_ID, CROWD_ID, SKY_ID = 1234567, 300, 70000   # panoptic segment ids (multi-byte)


def _categories():
  return [{"id": i, "name": n, "isthing": t} for i, n, t in categories.COCO_PANOPTIC]


def _contiguous(original_id):
  return [c[0] for c in categories.COCO_PANOPTIC].index(original_id)


def _id_to_rgb(ids):
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _write_image(path, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path, "JPEG")


def _panoptic_map():
  ids = np.zeros((H, W), np.int64)       # void by default
  ids[:20, :] = SKY_ID
  ids[25:40, 5:25] = PERSON_ID           # 15 x 20 person
  ids[30:45, 40:60] = CROWD_ID           # crowd of cars
  return ids


def write_coco(root):
  """Two train images (one without segments) and one validation image."""
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  ids = _panoptic_map()
  segments = [
      {"id": SKY_ID, "category_id": SKY, "iscrowd": 0, "area": int((ids == SKY_ID).sum()),
       "bbox": [0, 0, W, 20]},
      {"id": PERSON_ID, "category_id": PERSON, "iscrowd": 0, "area": 300, "bbox": [5, 25, 20, 15]},
      {"id": CROWD_ID, "category_id": CAR, "iscrowd": 1, "area": 300, "bbox": [40, 30, 20, 15]},
  ]
  for split, image_ids in (("train", (1, 2)), ("val", (3,))):
    name = f"{split}2017"
    png_dir = os.path.join(root, "annotations", f"panoptic_{name}")
    os.makedirs(png_dir, exist_ok=True)
    images, annotations, instances = [], [], []
    for image_id in image_ids:
      file_name = f"{image_id:012d}.jpg"
      _write_image(os.path.join(root, name, file_name), image_id)
      images.append({"id": image_id, "file_name": file_name, "height": H, "width": W})
      empty = image_id == 2
      Image.fromarray(_id_to_rgb(np.zeros_like(ids) if empty else ids)).save(
          os.path.join(png_dir, f"{image_id:012d}.png"))
      annotations.append({"image_id": image_id, "file_name": f"{image_id:012d}.png",
                          "segments_info": [] if empty else segments})
      if not empty:
        instances += [
            # A polygon square 20 x 20 and an RLE rectangle that overlaps it.
            {"id": 10 * image_id + 1, "image_id": image_id, "category_id": PERSON, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], "area": 400.0,
             "bbox": [10, 10, 20, 20]},
            {"id": 10 * image_id + 2, "image_id": image_id, "category_id": CAR, "iscrowd": 0,
             "segmentation": _rle(slice(20, 40), slice(20, 50)), "area": 600.0,
             "bbox": [20, 20, 30, 20]},
            {"id": 10 * image_id + 3, "image_id": image_id, "category_id": CAR, "iscrowd": 1,
             "segmentation": _rle(slice(0, 8), slice(0, 64), compressed=False), "area": 512.0,
             "bbox": [0, 0, 64, 8]},
        ]
    with open(os.path.join(root, "annotations", f"panoptic_{name}.json"), "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": _categories()}, f)
    with open(os.path.join(root, "annotations", f"instances_{name}.json"), "w") as f:
      json.dump({"images": images, "annotations": instances,
                 "categories": [c for c in _categories() if c["isthing"]]}, f)


def _rle(rows, cols, compressed=True):
  mask = np.zeros((H, W), np.uint8)
  mask[rows, cols] = 1
  if not compressed:   # uncompressed RLE: column-major run lengths starting with zeros
    flat = mask.T.reshape(-1)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
  rle = mask_util.encode(np.asfortranarray(mask))
  return {"size": [H, W], "counts": rle["counts"].decode()}


def _small(cfg, root, tmp):
  cfg.data.manual_dir = root
  cfg.data.data_dir = tmp
  cfg.data.augment = "none"
  cfg.data.image_size = (64, 64)
  cfg.data.eval_pad_size = (64, 64)
  cfg.data.min_size_test, cfg.data.max_size_test = 48, 64
  cfg.data.max_targets = 8
  cfg.data.shuffle_buffer = 4
  cfg.batch_size = 1
  cfg.eval.batch_size = 1
  return cfg


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("coco"))
  write_coco(root)
  return root


@pytest.fixture(scope="module")
def panoptic_cfg(coco_root, tmp_path_factory):
  return _small(coco_panoptic_r50.get_config(), coco_root, str(tmp_path_factory.mktemp("tfds")))


def test_panoptic_train_targets(panoptic_cfg):
  builder = data.get_builder(panoptic_cfg.data)
  assert builder.info.splits["train"].num_examples == 1       # the empty image is skipped
  batch = next(data.train_iterator(panoptic_cfg))
  labels, ids = batch["labels"][0], batch["segment_ids"][0, 0]
  assert sorted(labels[labels >= 0].tolist()) == sorted([_contiguous(SKY), _contiguous(PERSON)])
  panoptic = _panoptic_map()
  for m, label in enumerate(labels[labels >= 0]):
    original = {_contiguous(SKY): SKY_ID, _contiguous(PERSON): PERSON_ID}[int(label)]
    np.testing.assert_array_equal(ids[:H] == m + 1, panoptic == original)
  assert np.all(ids[:H][panoptic == CROWD_ID] == 0)    # crowd: no target
  assert np.all(ids[:H][panoptic == 0] == 0)           # void: no target
  assert np.all(ids[H:] == 0)                      # padding: no target
  np.testing.assert_array_equal(batch["valid_hw"][0], [H, W])


def test_panoptic_eval_ground_truth(panoptic_cfg):
  batch = next(data.eval_iterator(panoptic_cfg))
  gt = batch["ground_truth"][0]
  assert batch["image_id"][0] == 3 and batch["is_real"][0]
  np.testing.assert_array_equal(batch["orig_hw"][0], [H, W])
  np.testing.assert_array_equal(batch["valid_hw"][0], [48, 64])
  np.testing.assert_array_equal(gt["panoptic"], _panoptic_map())
  crowd = [s for s in gt["segments"] if s["id"] == CROWD_ID][0]
  assert crowd["iscrowd"] == 1 and crowd["isthing"] and crowd["category_id"] == _contiguous(CAR)
  assert gt["semantic"][0, 0] == _contiguous(SKY) and gt["semantic"][47, 0] == 255
  assert gt["semantic"][35, 50] == _contiguous(CAR)
  assert sorted(i["iscrowd"] for i in gt["instances"]) == [0, 1]   # sky is stuff


@pytest.fixture(scope="module")
def instance_cfg(coco_root, tmp_path_factory):
  cfg = _small(coco_instance_r50.get_config(), coco_root, str(tmp_path_factory.mktemp("tfds")))
  cfg.data.segment_layers = 2
  return cfg


def test_instances_keep_overlaps_exact(instance_cfg):
  builder = data.get_builder(instance_cfg.data)
  example = next(iter(builder.as_dataset("train").as_numpy_iterator()))
  assert example["layers"].shape[0] == 2     # the overlapping pair needs two layers
  batch = next(data.train_iterator(instance_cfg))
  labels, ids = batch["labels"][0], batch["segment_ids"][0]
  assert labels.tolist()[:3] == [_contiguous(PERSON), _contiguous(CAR), -1]   # crowd dropped
  polygon = mask_util.decode(mask_util.merge(mask_util.frPyObjects(
      [[10, 10, 30, 10, 30, 30, 10, 30]], H, W))).astype(bool)
  assert abs(int(polygon.sum()) - 400) <= 41      # a 20 x 20 square
  person = np.any(ids[:, :H] == 1, axis=0)
  car = np.any(ids[:, :H] == 2, axis=0)
  np.testing.assert_array_equal(person, polygon)
  expected_car = np.zeros((H, W), bool)
  expected_car[20:40, 20:50] = True
  np.testing.assert_array_equal(car, expected_car)
  assert np.any(person & car)                     # the overlap survives in both masks


def test_one_layer_drops_the_smaller_overlap_and_logs(instance_cfg, caplog):
  cfg = instance_cfg.copy_and_resolve_references()
  cfg.data.segment_layers = 1
  with caplog.at_level(logging.WARNING):
    batch = next(data.train_iterator(cfg))
  assert batch["labels"][0].tolist()[:2] == [_contiguous(CAR), -1]   # person (400) < car (600)
  assert "dropped 1 targets" in caplog.text


def test_instance_eval_ground_truth_has_rle_and_crowd(instance_cfg):
  gt = next(data.eval_iterator(instance_cfg))["ground_truth"][0]
  assert [i["iscrowd"] for i in gt["instances"]] == [0, 0, 1]
  crowd = mask_util.decode(gt["instances"][2]["segmentation"])
  assert crowd[:8].all() and not crowd[8:].any()
  assert gt["instances"][0]["area"] == 400.0 and gt["instances"][1]["bbox"] == [20, 20, 30, 20]
  assert "panoptic" not in gt and "semantic" not in gt


def test_png_id_missing_from_json_names_the_file(tmp_path):
  root = str(tmp_path)
  write_coco(root)
  path = os.path.join(root, "annotations", "panoptic_val2017.json")
  with open(path) as f:
    content = json.load(f)
  content["annotations"][0]["segments_info"].pop(1)      # PERSON_ID still in the PNG
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match=r"000000000003\.png.*1234567"):
    list(coco.generate_panoptic(path, os.path.join(root, "annotations", "panoptic_val2017"),
                                os.path.join(root, "val2017"), 133, False))


def test_corrupt_image_and_missing_image_name_the_file(tmp_path):
  root = str(tmp_path)
  write_coco(root)
  path = os.path.join(root, "annotations", "instances_val2017.json")
  image = os.path.join(root, "val2017", "000000000003.jpg")
  with open(image, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(ValueError, match="000000000003.jpg"):
    list(coco.generate_instances(path, os.path.join(root, "val2017"), 80, False))
  os.remove(image)
  with pytest.raises(FileNotFoundError, match="000000000003.jpg"):
    list(coco.generate_instances(path, os.path.join(root, "val2017"), 80, False))


def test_lsj_pads_with_128_and_moves_masks_with_the_image():
  image = np.zeros((40, 80, 3), np.uint8)
  image[10:30, 60:80] = 255                        # white block = segment 1
  layers = np.zeros((1, 40, 80), np.int32)
  layers[0, 10:30, 60:80] = 1
  for seed in range(6):
    out, out_layers, valid = transforms.large_scale_jitter(
        tf.constant(image), tf.constant(layers), tf.constant([seed, 0]), (64, 64), 0.5, 0.5)
    out, out_layers, valid = out.numpy(), out_layers.numpy()[0], valid.numpy()
    np.testing.assert_array_equal(valid, [16, 32])     # 80 -> 32 wide: scale 0.4
    assert np.all(out[16:] == 128) and np.all(out[:, 32:] == 128)
    assert np.all(out_layers[16:] == 0) and np.all(out_layers[:, 32:] == 0)
    assert out_layers.sum() > 0 and np.all(out[out_layers == 1].astype(int) > 150)
    assert np.all(out[:16, :32][out_layers[:16, :32] == 0].astype(int) < 100)
