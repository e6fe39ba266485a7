"""COCO panoptic, ResNet-50 (PQ 51.9 in the paper).

Reproduces the authors' coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs import base


def get_config():
  return base.get_base_config()
