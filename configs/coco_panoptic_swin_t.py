"""COCO panoptic, Swin-T (PQ 53.2 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("tiny")
  return c
