"""Shared by the Cityscapes recipes: ResNet-50 with synchronised BatchNorm, 512x1024 crops, 90k steps."""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs import base


def cityscapes_config(task: str, num_classes: int, tasks: tuple):
  c = base.use_poly_recipe(
      base.get_base_config(), data_name=f"cityscapes_{task}", augment="cityscapes",
      num_classes=num_classes, total_steps=90_000, crop=(512, 1024), short_side=1024,
      max_size_train=4096, min_size_test=1024, max_size_test=2048)
  c.model.backbone = base.resnet_backbone(50, norm="sync_bn")
  c.data.eval_pad_size = (1024, 2048)           # Cityscapes images are 1024x2048 (wider ones fit too)
  c.eval.tasks = tasks
  return c
