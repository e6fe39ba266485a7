"""Cityscapes semantic segmentation, ResNet-50 with synchronised BatchNorm (mIoU 79.4 in the paper)."""
from configs.cityscapes_common import cityscapes_config


def get_config():
  return cityscapes_config("semantic", num_classes=19, tasks=("semantic",))
