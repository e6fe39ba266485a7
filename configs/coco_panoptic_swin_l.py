"""COCO panoptic, Swin-L (PQ 57.8 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("large")
  c.model.decoder.num_queries = 200
  return c
