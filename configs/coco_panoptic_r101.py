"""COCO panoptic, ResNet-101 (PQ 52.6 in the paper).

Reproduces the authors' coco/panoptic-segmentation/maskformer2_R101_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-101.pkl (authors' tools/convert-torchvision-to-d2.py of resnet101-63fe2227.pth)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.resnet_backbone(101)
  return c
