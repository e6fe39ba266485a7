"""Cityscapes builder (leftImg8bit + gtFine, read offline): semantic, instance and panoptic.

All three come from the official `*_gtFine_labelIds.png` and `*_gtFine_instanceIds.png` files
(instance id = label id * 1000 + k; a value below 1000 is a label id, and for a class with
instances it marks a crowd region), with the rules of cityscapesScripts: train ids 0..18 for
semantic and panoptic, the 8 classes with instances (0..7) for instance segmentation; labels
ignored in evaluation (train id 255, including caravan and trailer) are no target.
"""
import dataclasses
import functools
import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from m2f_jax.data import builders_base
from m2f_jax.data import categories
from m2f_jax.data import example_format

_LAYOUT = """manual_dir/
  leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
  gtFine/{train,val}/CITY/*_gtFine_labelIds.png and *_gtFine_instanceIds.png"""

_TRAIN_ID = np.full(256, 255, np.int32)
for _label_id, _, _train_id, _ in categories.CITYSCAPES_LABELS:
  _TRAIN_ID[_label_id] = _train_id
_FIRST_THING_TRAIN_ID = min(t for _, _, t, has in categories.CITYSCAPES_LABELS if has)


def train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Label ids [H, W] -> train ids [H, W] (255 = ignore)."""
  return _TRAIN_ID[np.clip(label_ids, 0, 255)]


def instance_segments(instance_ids: np.ndarray, task: str, where: str):
  """instanceIds [H, W] -> (index map, segments) for task 'panoptic' or 'instance'."""
  index_map = np.zeros(instance_ids.shape, np.uint16)
  segments = []
  for value in np.unique(instance_ids):
    label_id = int(value) // 1000 if value >= 1000 else int(value)
    if label_id > 255:
      raise ValueError(f"{where}: instance id {value} has an invalid label id {label_id}")
    train_id = int(_TRAIN_ID[label_id])
    if train_id == 255 or label_id in categories.CITYSCAPES_IGNORED_INSTANCE_LABELS:
      continue
    is_thing = train_id >= _FIRST_THING_TRAIN_ID
    if task == "instance" and not is_thing:
      continue
    mask = instance_ids == value
    segments.append(dict(
        id=int(value), category_id=train_id - (_FIRST_THING_TRAIN_ID if task == "instance" else 0),
        iscrowd=int(is_thing and value < 1000), area=float(mask.sum()),
        bbox=example_format.mask_bbox(mask)))
    index_map[mask] = len(segments)
  return index_map, segments


def semantic_segments(label_ids: np.ndarray):
  """labelIds [H, W] -> (index map, one segment per train id present)."""
  return example_format.semantic_segments(train_ids(label_ids))


def generate(image_root: str, gt_root: str, task: str, skip_empty: bool):
  """Yields examples of one Cityscapes split for task 'semantic', 'instance' or 'panoptic'."""
  files = sorted(glob.glob(os.path.join(image_root, "*", "*_leftImg8bit.png")))
  if not files:
    raise FileNotFoundError(f"No */*_leftImg8bit.png under {image_root}; layout:\n{_LAYOUT}")
  skipped = builders_base.SkipCounter(gt_root, "no segments")
  for i, image_path in enumerate(files):
    city = os.path.basename(os.path.dirname(image_path))
    stem = os.path.basename(image_path)[:-len("_leftImg8bit.png")]
    if task == "semantic":
      gt_path = os.path.join(gt_root, city, stem + "_gtFine_labelIds.png")
      gt = example_format.read_png(gt_path).astype(np.int32)
      index_map, segments = semantic_segments(gt)
    else:
      gt_path = os.path.join(gt_root, city, stem + "_gtFine_instanceIds.png")
      gt = example_format.read_png(gt_path).astype(np.int32)
      index_map, segments = instance_segments(gt, task, gt_path)
    image_bytes, size = example_format.read_image_bytes(image_path)
    if size != gt.shape[:2]:
      raise ValueError(f"{gt_path} is {gt.shape[:2]}, its image {image_path} is {size}")
    if not segments and skip_empty:
      skipped.add()
      continue
    yield i, example_format.make_example(image_bytes, i, f"{city}/{stem}", [index_map], segments)
  skipped.log()


@dataclasses.dataclass
class CityscapesConfig(tfds.core.BuilderConfig):
  task: str = "panoptic"


class M2fCityscapes(builders_base.ManualBuilder):
  """Cityscapes fine annotations; configs 'semantic', 'instance', 'panoptic'."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _LAYOUT
  BUILDER_CONFIGS = [CityscapesConfig(name=t, task=t) for t in ("semantic", "instance",
                                                                 "panoptic")]

  def _split_generators(self, dl_manager):

    def split_examples(split, folder):
      image_root = self._manual_path(dl_manager, os.path.join("leftImg8bit", folder))
      gt_root = self._manual_path(dl_manager, os.path.join("gtFine", folder))
      return self._generate_examples(image_root, gt_root, self.builder_config.task,
                                     split == "train")

    return self._splits_on_disk({split: functools.partial(split_examples, split, folder)
                                 for split, folder in (("train", "train"), ("validation", "val"))})

  def _generate_examples(self, *args):
    return generate(*args)
