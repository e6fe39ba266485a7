"""COCO panoptic, Swin-B (PQ 56.4 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("base")
  return c
