"""COCO panoptic, ResNet-50 (PQ 51.9 in the paper)."""
from configs import base


def get_config():
  return base.get_base_config()
