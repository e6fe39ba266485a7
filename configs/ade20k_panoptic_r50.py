"""ADE20K panoptic segmentation, ResNet-50, 640x640 crops (PQ 39.7 in the paper).

Reproduces the authors' ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs import base


def get_config():
  c = base.use_poly_recipe(
      base.get_base_config(), data_name="ade20k_panoptic", augment="ade20k", num_classes=150,
      total_steps=160_000, crop=(640, 640), short_side=640, max_size_train=2560,
      min_size_test=640, max_size_test=2560)
  c.data.eval_pad_size = (2560, 2560)           # any image at the test sizes, wide or tall
  return c
