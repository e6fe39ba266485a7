"""ADE20K semantic segmentation, ResNet-50, 512x512 crops (mIoU 47.2 in the paper).

Reproduces the authors' ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs import base


def get_config():
  c = base.use_poly_recipe(
      base.get_base_config(), data_name="ade20k_semantic", augment="ade20k", num_classes=150,
      total_steps=160_000, crop=(512, 512), short_side=512, max_size_train=2048,
      min_size_test=512, max_size_test=2048)
  c.eval.tasks = ("semantic",)
  c.data.eval_pad_size = (2048, 2048)           # any image at the test sizes, wide or tall
  return c
