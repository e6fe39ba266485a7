"""cfg.data.name -> tfds builder, built into cfg.data.data_dir on first use and reused after."""
import logging

import tensorflow_datasets as tfds

from m2f_jax.data import ade20k
from m2f_jax.data import cityscapes
from m2f_jax.data import coco
from m2f_jax.data import custom
from m2f_jax.data import info as info_lib
from m2f_jax.data import synthetic

_BUILDERS = {
    "coco_panoptic": (coco.M2fCocoPanoptic, None),
    "coco_instance": (coco.M2fCocoInstance, None),
    "ade20k_semantic": (ade20k.M2fAde20kSemantic, None),
    "ade20k_panoptic": (ade20k.M2fAde20kPanoptic, None),
    "cityscapes_semantic": (cityscapes.M2fCityscapes, "semantic"),
    "cityscapes_instance": (cityscapes.M2fCityscapes, "instance"),
    "cityscapes_panoptic": (cityscapes.M2fCityscapes, "panoptic"),
}


def make_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The tfds builder of `data_cfg.name` in `data_cfg.data_dir`, not prepared yet."""
  if data_cfg.name == "custom":
    return custom.M2fCustom(config=custom.custom_config(data_cfg.custom), data_dir=data_cfg.data_dir)
  info_lib.dataset_kind(data_cfg.name)
  if data_cfg.name == "synthetic":
    s = data_cfg.get("synthetic", None) or {}
    config = synthetic.synthetic_config(
        train_size=s.get("train_size", 2000), validation_size=s.get("validation_size", 200),
        image_size=s.get("image_size", 128), seed=s.get("seed", 0))
    if config.name in synthetic.M2fSynthetic.builder_configs:
      config = config.name   # tfds refuses an equal copy of a registered config
    return synthetic.M2fSynthetic(config=config, data_dir=data_cfg.data_dir)
  builder_cls, config = _BUILDERS[data_cfg.name]
  return builder_cls(config=config, data_dir=data_cfg.data_dir)


def get_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of `data_cfg.name`; prepares it offline if it is not there yet.

  The synthetic set is generated; a custom one reads the files of `data_cfg.custom`; the
  others read `data_cfg.manual_dir` (official layout).
  """
  builder = make_builder(data_cfg)
  if not builder.is_prepared():
    if data_cfg.name not in ("synthetic", "custom") and not data_cfg.manual_dir:
      raise ValueError(
          f"Data set {data_cfg.name!r} is not prepared in {builder.data_dir} and "
          f"cfg.data.manual_dir is not set; point it at the official files:\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    logging.info("Preparing %s into %s", data_cfg.name, builder.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=data_cfg.manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP,
        try_download_gcs=False))
  return builder


def check_split(builder: tfds.core.DatasetBuilder, data_cfg, split: str) -> None:
  """Raises ValueError naming the fix when the prepared `builder` lacks a split that `split` reads
  (a tfds split string: 'train', 'train[:10%]', 'train+validation')."""
  for part in split.split("+"):
    base = part.split("[", 1)[0].strip()
    if base not in builder.info.splits:
      raise ValueError(
          f"{data_cfg.name} in {builder.data_dir} has no split {base!r} (it has "
          f"{sorted(builder.info.splits)}; a split whose files were missing from manual_dir is "
          f"left out when the data set is built): add its files and delete {builder.data_dir} "
          "to rebuild")
