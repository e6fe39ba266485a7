"""COCO panoptic, Swin-T (PQ 53.2 in the paper).

Reproduces the authors' coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=swin_tiny_patch4_window7_224.pth (Swin release, IN-1k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("tiny")
  return c
