"""COCO panoptic, Swin-B, ImageNet-21k 384 weights (PQ 56.4 in the paper).

Reproduces the authors'
coco/panoptic-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=swin_base_patch4_window12_384_22k.pth (Swin release, IN-21k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("base")
  return c
