"""COCO panoptic, ResNet-101 (PQ 52.6 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.resnet_backbone(101)
  return c
