"""COCO panoptic, Swin-S (PQ 54.6 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("small")
  return c
