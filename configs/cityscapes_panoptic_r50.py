"""Cityscapes panoptic segmentation, ResNet-50 with synchronised BatchNorm (PQ 62.1 in the paper).

Reproduces the authors' cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs.cityscapes_common import cityscapes_config


def get_config():
  return cityscapes_config("panoptic", num_classes=19, tasks=("panoptic", "instance", "semantic"))
