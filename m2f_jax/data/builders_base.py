"""The base class of the builders that read an official data set layout from a manual directory.

Why our own builders rather than tfds' coco/2017_panoptic, scene_parse150 and cityscapes: those
download archives from the internet (COCO, ADE20K) or read zip archives (Cityscapes), keep the
data sets' original category ids, store COCO instances as boxes or flattened masks without their
overlaps, and lack ADE20K panoptic and the Cityscapes instance/panoptic ground truth. Ours read the
extracted official files offline, map categories to contiguous ids 0..K-1 and all write the one
example format of `example_format`, so one tf.data pipeline serves every data set.
"""
import logging
import os

import tensorflow_datasets as tfds

from m2f_jax.data import example_format


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads extracted official files from `download_config.manual_dir`; no network access."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=example_format.features())

  def _manual_path(self, dl_manager, *candidates: str) -> str:
    """The first existing candidate path under the manual directory; raises naming them all."""
    root = os.fspath(dl_manager.manual_dir)
    for candidate in candidates:
      path = os.path.join(root, candidate)
      if os.path.exists(path):
        return path
    raise FileNotFoundError(
        f"{self.name}: none of {list(candidates)} found under the manual directory {root}. "
        f"Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _splits_on_disk(self, makers: dict) -> dict:
    """{split: examples} of the splits whose files exist (a data set may come with its validation
    split only); `makers` maps each split to a function returning its examples that raises
    FileNotFoundError when the split's files are missing. With none on disk, the first error is
    raised; missing splits are left out with a warning."""
    splits, missing = {}, {}
    for split, make in makers.items():
      try:
        splits[split] = make()
      except FileNotFoundError as e:
        missing[split] = e
    if not splits:
      raise next(iter(missing.values()))
    for split, error in missing.items():
      logging.warning("%s: building without the %s split, whose files are missing (%s)", self.name,
                      split, str(error).splitlines()[0])
    return splits


class SkipCounter:
  """Counts images skipped for a reason and logs the total once a split is done."""

  def __init__(self, where: str, reason: str):
    self.where, self.reason, self.count = where, reason, 0

  def add(self) -> None:
    self.count += 1

  def log(self) -> None:
    if self.count:
      logging.warning("%s: skipped %d images (%s)", self.where, self.count, self.reason)
