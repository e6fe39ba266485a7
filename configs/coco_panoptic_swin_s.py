"""COCO panoptic, Swin-S (PQ 54.6 in the paper)."""
# ImageNet backbone: --config.model.backbone.init_from=swin_small_patch4_window7_224.pth (Swin release, IN-1k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("small")
  return c
