"""COCO panoptic, Swin-L (PQ 57.8 in the paper)."""
# ImageNet backbone: --config.model.backbone.init_from=swin_large_patch4_window12_384_22k.pth (Swin release, IN-21k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("large")
  c.model.decoder.num_queries = 200
  return c
