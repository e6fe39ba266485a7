"""ADE20K builders: SceneParsing-150 semantic and the authors' panoptic layout (offline).

Semantic: annotation PNG value v in 1..150 is class v - 1, 0 is ignore (as the authors' prepared
`annotations_detectron2`). One segment per class present, so a semantic target is one mask per
class, as in the authors' semantic mapper. Panoptic: the COCO-panoptic-format files that the
authors' `prepare_ade20k_pan_seg.py` writes next to the images.
"""
import functools
import glob
import os
import re

import numpy as np

from m2f_jax.data import builders_base
from m2f_jax.data import coco
from m2f_jax.data import example_format

NUM_CLASSES = 150
_LAYOUT = """manual_dir/ADEChallengeData2016/   (or manual_dir itself)
  images/{training,validation}/ADE_*.jpg
  annotations/{training,validation}/ADE_*.png                       (semantic)
  ade20k_panoptic_{train,val}.json + ade20k_panoptic_{train,val}/*.png  (panoptic)"""
_SPLITS = (("train", "training", "train"), ("validation", "validation", "val"))


def _image_number(file_name: str, fallback: int) -> int:
  digits = re.findall(r"\d+", os.path.basename(file_name))
  return int(digits[-1]) if digits else fallback


def generate_semantic(image_dir: str, label_dir: str, skip_empty: bool):
  """Yields examples of one ADE20K semantic split."""
  files = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
  if not files:
    raise FileNotFoundError(f"No .jpg images in {image_dir}")
  skipped = builders_base.SkipCounter(label_dir, "only ignore pixels")
  for i, image_path in enumerate(files):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    label_path = os.path.join(label_dir, stem + ".png")
    label = example_format.read_png(label_path)
    if label.ndim != 2:
      raise ValueError(f"{label_path}: semantic PNG must be single channel, got {label.shape}")
    if label.max(initial=0) > NUM_CLASSES:
      raise ValueError(f"{label_path}: value {label.max()} above {NUM_CLASSES}")
    label = np.where(label == 0, 255, label.astype(np.int32) - 1)
    if skip_empty and np.all(label == 255):
      skipped.add()
      continue
    image_id = _image_number(stem, i)
    yield image_id, example_format.semantic_example(image_path, label, label_path, image_id)
  skipped.log()


class M2fAde20kSemantic(builders_base.ManualBuilder):
  """ADE20K SceneParsing (150 classes), semantic."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _LAYOUT

  def _split_generators(self, dl_manager):
    root = self._manual_path(dl_manager, "ADEChallengeData2016", ".")

    def split_examples(split, folder):
      image_dir = os.path.join(root, "images", folder)
      label_dir = os.path.join(root, "annotations", folder)
      for path in (image_dir, label_dir):
        if not os.path.isdir(path):
          raise FileNotFoundError(f"{path} missing; expected layout:\n{_LAYOUT}")
      return self._generate_examples(image_dir, label_dir, split == "train")

    return self._splits_on_disk({split: functools.partial(split_examples, split, folder)
                                 for split, folder, _ in _SPLITS})

  def _generate_examples(self, *args):
    return generate_semantic(*args)


class M2fAde20kPanoptic(builders_base.ManualBuilder):
  """ADE20K panoptic (150 classes, 100 things) in the authors' prepared layout."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _LAYOUT

  def _split_generators(self, dl_manager):
    root = self._manual_path(dl_manager, "ADEChallengeData2016", ".")

    def split_examples(split, folder, short):
      json_path = os.path.join(root, f"ade20k_panoptic_{short}.json")
      png_dir = os.path.join(root, f"ade20k_panoptic_{short}")
      image_dir = os.path.join(root, "images", folder)
      for path in (json_path, png_dir, image_dir):
        if not os.path.exists(path):
          raise FileNotFoundError(f"{path} missing; expected layout:\n{_LAYOUT}")
      return self._generate_examples(json_path, png_dir, image_dir, NUM_CLASSES, split == "train")

    return self._splits_on_disk({split: functools.partial(split_examples, split, folder, short)
                                 for split, folder, short in _SPLITS})

  def _generate_examples(self, *args):
    return coco.generate_panoptic(*args)
