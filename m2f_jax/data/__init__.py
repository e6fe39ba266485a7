"""Input pipelines: tfds builders (synthetic, COCO, ADE20K, Cityscapes), transforms, tf.data."""
from m2f_jax.data.custom_files import resolve_num_classes
from m2f_jax.data.info import DatasetInfo
from m2f_jax.data.info import get_dataset_info
from m2f_jax.data.pipeline import eval_iterator
from m2f_jax.data.pipeline import train_iterator
from m2f_jax.data.registry import get_builder

__all__ = ["DatasetInfo", "eval_iterator", "get_builder", "get_dataset_info", "resolve_num_classes",
           "train_iterator"]
