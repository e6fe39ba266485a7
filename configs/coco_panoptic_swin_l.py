"""COCO panoptic, Swin-L, ImageNet-21k 384 weights, 200 queries, 100 epochs (PQ 57.8 in the paper).

Reproduces the authors'
coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=swin_large_patch4_window12_384_22k.pth (Swin release, IN-21k)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.swin_backbone("large")
  c.model.decoder.num_queries = 200
  c.total_steps = 737_500                      # 100 epochs; lr x 0.1 at 655,556 and 710,184
  c.optimizer.step_fractions = (655_556 / 737_500, 710_184 / 737_500)
  return c
