"""Your own data (configs/custom.py): the three formats with odd category ids, built into tfds,
decoded and checked; categories and num_classes from the data; rebuilds; bad input errors."""
import json
import logging
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from configs import custom as custom_config
from m2f_jax import data
from m2f_jax.data import custom_files
import custom_data_files as files
from custom_data_files import CAT, DOG, GRASS, H, W


def _cfg(keys: dict, tfds_dir: str):
  cfg = custom_config.get_config()
  cfg.data.custom.update(keys)
  cfg.data.data_dir = tfds_dir
  cfg.data.augment = "none"
  cfg.data.image_size = (64, 64)
  cfg.data.eval_pad_size = (64, 64)
  cfg.data.min_size_test, cfg.data.max_size_test = H, W
  cfg.data.segment_layers = 2
  cfg.data.max_targets = 8
  cfg.batch_size = 1
  cfg.eval.batch_size = 1
  return cfg


def _examples(cfg, split: str) -> list:
  """The decoded examples of a split in image id order (tfds stores them hashed by key)."""
  builder = data.get_builder(cfg.data)
  examples = builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()
  return sorted(examples, key=lambda e: e["image_id"])


def _mask(example, segment: int) -> np.ndarray:
  layer = example["segments"]["layer"][segment]
  return example["layers"][layer][..., 0] == segment + 1


@pytest.fixture(scope="module")
def panoptic(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("panoptic"))
  return _cfg(files.write_coco_panoptic(root), str(tmp_path_factory.mktemp("tfds")))


def test_coco_panoptic_decodes_with_the_data_categories(panoptic, caplog):
  info = data.get_dataset_info(panoptic.data)
  assert info.kind == "panoptic" and info.class_names == files.NAMES
  assert info.category_ids == (CAT, DOG, GRASS) and info.is_thing.tolist() == [True, True, False]
  with caplog.at_level(logging.WARNING):
    train = _examples(panoptic, "train")
  assert [e["image_id"] for e in train] == [11, 12]      # 13 has no segments: skipped, logged
  assert "skipped 1 images (no segments)" in caplog.text
  val = _examples(panoptic, "validation")
  assert [e["image_id"] for e in val] == [21, 22]
  example = val[0]
  masks = files.scene(21 % 3)
  seg = example["segments"]
  assert seg["category_id"].tolist() == [2, 0, 1]        # grass 40, cat 7, dog 12 -> 2, 0, 1
  assert seg["iscrowd"].tolist() == [0, 0, 1]
  assert seg["id"].tolist() == [files.GRASS_SEG, files.CAT_SEG, files.CROWD_SEG]
  for i, key in enumerate(("grass", "cat", "crowd")):
    np.testing.assert_array_equal(_mask(example, i), masks[key])
  void = ~(masks["grass"] | masks["cat"] | masks["crowd"])
  assert np.all(example["layers"][0][..., 0][void] == 0)

  gt = next(data.eval_iterator(panoptic))["ground_truth"][0]
  masks = files.scene(gt["image_id"] % 3)
  void = ~(masks["grass"] | masks["cat"] | masks["crowd"])
  assert gt["semantic"][0, 0] == 2 and gt["semantic"][void].tolist() == [255] * int(void.sum())
  assert [(i["category_id"], i["iscrowd"]) for i in gt["instances"]] == [(0, 0), (1, 1)]

  batch = next(data.train_iterator(panoptic))
  assert sorted(batch["labels"][0][batch["labels"][0] >= 0].tolist()) == [0, 2]   # crowd: no target


def test_num_classes_follows_the_data_and_a_contradiction_is_an_error(panoptic):
  cfg = panoptic.copy_and_resolve_references()
  assert cfg.model.num_classes is None
  data.resolve_num_classes(cfg)
  assert cfg.model.num_classes == 3
  data.resolve_num_classes(cfg)                          # an agreeing value is kept
  cfg.model.num_classes = 5
  with pytest.raises(ValueError, match=r"num_classes=5 contradicts the data: .*panoptic.json has 3"):
    data.resolve_num_classes(cfg)


def test_changed_files_rebuild_and_unchanged_reuse(tmp_path):
  keys = files.write_coco_panoptic(str(tmp_path / "d"))
  cfg = _cfg(keys, str(tmp_path / "tfds"))
  first = data.get_builder(cfg.data)
  assert first.info.splits["validation"].num_examples == 2
  assert data.get_builder(cfg.data).data_dir == first.data_dir      # built once
  with open(keys["val_annotations"]) as f:
    val = json.load(f)
  val["annotations"] = val["annotations"][:1]
  with open(keys["val_annotations"], "w") as f:
    json.dump(val, f)
  second = data.get_builder(cfg.data)
  assert second.data_dir != first.data_dir
  assert second.info.splits["validation"].num_examples == 1


def test_only_a_validation_split(tmp_path):
  keys = files.write_coco_panoptic(str(tmp_path / "d"))
  keys = {k: v for k, v in keys.items() if not k.startswith("train_")}
  cfg = _cfg(keys, str(tmp_path / "tfds"))
  assert list(data.get_builder(cfg.data).info.splits) == ["validation"]
  assert len(next(data.eval_iterator(cfg))["ground_truth"][0]["segments"]) == 3


def test_coco_instance_keeps_overlaps_polygons_rle_and_crowd(tmp_path):
  cfg = _cfg(files.write_coco_instance(str(tmp_path / "d")), str(tmp_path / "tfds"))
  info = data.get_dataset_info(cfg.data)
  assert info.kind == "instance" and info.class_names == ("cat", "dog")
  assert info.category_ids == (CAT, DOG) and info.is_thing.all()
  example = _examples(cfg, "validation")[0]
  masks = files.scene(21 % 3)
  seg = example["segments"]
  assert seg["category_id"].tolist() == [0, 0, 1] and seg["iscrowd"].tolist() == [0, 0, 1]
  assert example["layers"].shape[0] == 2                # the two cats overlap
  for i, key in enumerate(("cat", "cat2", "crowd")):
    np.testing.assert_array_equal(_mask(example, i), masks[key])
  gt = next(data.eval_iterator(cfg))["ground_truth"][0]
  assert "panoptic" not in gt and "semantic" not in gt
  assert [i["iscrowd"] for i in gt["instances"]] == [0, 0, 1]


def test_semantic_png_classes_ignore_and_labels(tmp_path):
  cfg = _cfg(files.write_semantic_png(str(tmp_path / "d")), str(tmp_path / "tfds"))
  info = data.get_dataset_info(cfg.data)
  assert info.kind == "semantic" and info.class_names == files.NAMES
  assert info.category_ids == (0, 1, 2) and not info.is_thing.any()
  assert len(_examples(cfg, "train")) == 2
  gt = next(data.eval_iterator(cfg))["ground_truth"][0]   # c.png, written with shift 0
  np.testing.assert_array_equal(gt["semantic"], files.semantic_label(0))
  assert "panoptic" not in gt and "instances" not in gt


# ------------------------------------------------------------------ bad input
def _build(cfg):
  return data.get_builder(cfg.data)


def test_unknown_category_id_names_the_json(tmp_path):
  keys = files.write_coco_panoptic(str(tmp_path / "d"))
  with open(keys["train_annotations"]) as f:
    train = json.load(f)
  train["annotations"][0]["segments_info"][1]["category_id"] = 99
  with open(keys["train_annotations"], "w") as f:
    json.dump(train, f)
  with pytest.raises(ValueError, match=rf"{keys['train_annotations']}: segment .* img11.png has "
                     r"unknown category_id 99"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


def test_png_segment_missing_from_the_json_names_the_png(tmp_path):
  keys = files.write_coco_panoptic(str(tmp_path / "d"))
  with open(keys["val_annotations"]) as f:
    val = json.load(f)
  val["annotations"][1]["segments_info"].pop(0)         # grass stays in img22.png
  with open(keys["val_annotations"], "w") as f:
    json.dump(val, f)
  png = os.path.join(keys["val_panoptic_masks"], "img22.png")
  with pytest.raises(ValueError, match=rf"{png}: segment ids \[{files.GRASS_SEG}\] appear in the PNG"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


def test_missing_image_names_the_file(tmp_path):
  keys = files.write_coco_instance(str(tmp_path / "d"))
  missing = os.path.join(keys["train_images"], "img12.png")
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match=f"Image file missing: {missing}"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


def test_semantic_label_out_of_range_names_the_png(tmp_path):
  keys = files.write_semantic_png(str(tmp_path / "d"))
  label = files.semantic_label(0)
  label[0, 0] = 3                                          # K = 3: values 0..2 and 255 only
  bad = os.path.join(keys["val_annotations"], "c.png")
  Image.fromarray(label).save(bad)
  with pytest.raises(ValueError, match=rf"{bad}: values \[3\] are neither a class index 0..2"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


def test_semantic_label_without_image_and_image_without_label(tmp_path, caplog):
  keys = files.write_semantic_png(str(tmp_path / "d"))
  shutil.copy(os.path.join(keys["train_images"], "a.jpg"), os.path.join(keys["train_images"], "x.jpg"))
  with caplog.at_level(logging.WARNING):
    _build(_cfg(keys, str(tmp_path / "tfds")))
  assert "skipped 1 images (no label PNG of the same stem)" in caplog.text
  os.remove(os.path.join(keys["val_images"], "c.jpg"))
  with pytest.raises(FileNotFoundError, match=r"c.png: no image c\.\*"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


def test_splits_with_different_categories_are_refused(tmp_path):
  keys = files.write_coco_panoptic(str(tmp_path / "d"))
  with open(keys["val_annotations"]) as f:
    val = json.load(f)
  val["categories"][0]["id"] = 8
  with open(keys["val_annotations"], "w") as f:
    json.dump(val, f)
  with pytest.raises(ValueError, match="categories of .* differ"):
    _build(_cfg(keys, str(tmp_path / "tfds")))


@pytest.mark.parametrize("change, error", [
    (dict(format="voc"), "format must be one of"),
    (dict(train_annotations=None), "train_annotations not set"),
    (dict(val_images="/no/such/dir"), "val_images='/no/such/dir' is not an existing directory"),
    (dict(classes="x.txt"), "classes is for format 'semantic_png' only"),
])
def test_bad_keys_are_named(panoptic, change, error):
  cfg = panoptic.copy_and_resolve_references()
  cfg.data.custom.update(change)
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    custom_files.split_files(cfg.data.custom)


def test_classes_file_with_a_blank_line_is_refused(tmp_path):
  path = tmp_path / "classes.txt"
  path.write_text("cat\n\ngrass\n")
  with pytest.raises(ValueError, match="line 2 is blank"):
    custom_files.classes_file_categories(str(path))
