"""COCO panoptic, Swin-S (PQ 54.6 in the paper).

Reproduces the authors' coco/panoptic-segmentation/swin/maskformer2_swin_small_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=swin_small_patch4_window7_224.pth (Swin release, IN-1k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("small")
  return c
