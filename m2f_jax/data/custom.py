"""The tfds builder of your own data set (cfg.data.name='custom', files in cfg.data.custom).

COCO panoptic and COCO instance files are read by the COCO builder's readers; semantic PNGs
(value = class index, 255 = ignore) by `generate_semantic_png`. One tfds directory per file
fingerprint (`custom_files.fingerprint`), so the data is built once and rebuilt when a file
changes. Train splits skip images without any segment (counted and logged).
"""
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from m2f_jax.data import builders_base
from m2f_jax.data import coco
from m2f_jax.data import custom_files
from m2f_jax.data import example_format

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _images_by_stem(image_dir: str) -> dict[str, str]:
  images = {}
  for name in sorted(os.listdir(image_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    if stem in images:
      raise ValueError(f"{image_dir}: images {os.path.basename(images[stem])} and {name} share "
                       "the stem the label PNG is matched by; rename one")
    images[stem] = os.path.join(image_dir, name)
  return images


def generate_semantic_png(image_dir: str, label_dir: str, classes_path: str, num_classes: int,
                          skip_empty: bool):
  """Yields examples of one split: every label PNG in `label_dir` and the image of its stem.

  Label values are class indices 0..K-1 (line i of `classes_path` names value i), 255 ignore;
  any other value is an error naming the PNG. Images without a label PNG are skipped (counted
  and logged); a label PNG without its image is an error.
  """
  labels = sorted(n for n in os.listdir(label_dir) if n.lower().endswith(".png"))
  if not labels:
    raise FileNotFoundError(f"No .png label files in {label_dir}")
  images = _images_by_stem(image_dir)
  unlabelled = builders_base.SkipCounter(image_dir, "no label PNG of the same stem")
  label_stems = {os.path.splitext(n)[0] for n in labels}
  for _ in sorted(set(images) - label_stems):
    unlabelled.add()
  unlabelled.log()
  skipped = builders_base.SkipCounter(label_dir, "only ignore pixels")
  for image_id, name in enumerate(labels):
    label_path = os.path.join(label_dir, name)
    stem = os.path.splitext(name)[0]
    if stem not in images:
      raise FileNotFoundError(f"{label_path}: no image {stem}.* ({'/'.join(IMAGE_EXTENSIONS)}) "
                              f"in {image_dir}")
    label = example_format.read_png(label_path)
    if label.ndim != 2:
      raise ValueError(f"{label_path}: a semantic label PNG has one channel (value = class "
                       f"index), got shape {label.shape}")
    label = label.astype(np.int64)
    bad = np.unique(label[(label >= num_classes) & (label != 255)])
    if bad.size:
      raise ValueError(f"{label_path}: values {bad[:10].tolist()} are neither a class index "
                       f"0..{num_classes - 1} of {classes_path} nor 255 (ignore)")
    if skip_empty and np.all(label == 255):
      skipped.add()
      continue
    yield image_id, example_format.semantic_example(images[stem], label.astype(np.int32),
                                                    label_path, image_id)
  skipped.log()


@dataclasses.dataclass
class CustomConfig(tfds.core.BuilderConfig):
  """The files of a custom data set; the name holds their format and fingerprint."""
  format: str = ""
  splits: tuple = ()      # ((tfds split, custom_files.SplitFiles), ...)
  classes: str = ""       # semantic_png only


def custom_config(custom_cfg) -> CustomConfig:
  """A CustomConfig of cfg.data.custom, named '<format>_<fingerprint>'."""
  fmt = custom_files.check_format(custom_cfg)
  return CustomConfig(
      name=f"{fmt}_{custom_files.fingerprint(custom_cfg)}", version=tfds.core.Version("1.0.0"),
      description=f"custom data set, format {fmt}", format=fmt,
      splits=tuple(sorted(custom_files.split_files(custom_cfg).items())),
      classes=custom_cfg.get("classes", None) or "")


class M2fCustom(builders_base.ManualBuilder):
  """Your own data set in one of the formats of `custom_files.FORMATS`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = custom_files.__doc__

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are named by the config.
    c = self.builder_config
    if c.format == "semantic_png":
      categories = custom_files.classes_file_categories(c.classes)
    else:   # every split's JSON must list the same categories, as their ids are mapped by rank
      per_split = {s: custom_files.json_categories(f.annotations, c.format) for s, f in c.splits}
      categories = per_split.get("validation") or per_split["train"]
      for other in per_split.values():
        if dataclasses.replace(other, source="") != dataclasses.replace(categories, source=""):
          raise ValueError(f"the categories of {other.source} differ from those of "
                           f"{categories.source}; both splits must list the same ids, names and "
                           "isthing flags")
    k = len(categories.ids)
    return {split: self._generate_examples(files, k, split == "train") for split, files in c.splits}

  def _generate_examples(self, files: custom_files.SplitFiles, num_classes: int, skip_empty: bool):
    c = self.builder_config
    if c.format == "coco_panoptic":
      return coco.generate_panoptic(files.annotations, files.panoptic_masks, files.images,
                                    num_classes, skip_empty)
    if c.format == "coco_instance":
      return coco.generate_instances(files.annotations, files.images, num_classes, skip_empty)
    return generate_semantic_png(files.images, files.annotations, c.classes, num_classes,
                                 skip_empty)
