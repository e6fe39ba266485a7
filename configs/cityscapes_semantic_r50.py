"""Cityscapes semantic segmentation, ResNet-50 with synchronised BatchNorm (mIoU 79.4 in the paper).

Reproduces the authors' cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml.
"""
from configs.cityscapes_common import cityscapes_config


def get_config():
  return cityscapes_config("semantic", num_classes=19, tasks=("semantic",))
