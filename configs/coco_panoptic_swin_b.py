"""COCO panoptic, Swin-B (PQ 56.4 in the paper)."""
# ImageNet backbone: --config.model.backbone.init_from=swin_base_patch4_window12_384_22k.pth (Swin release, IN-21k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("base")
  return c
