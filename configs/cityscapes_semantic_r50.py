"""Cityscapes semantic segmentation, ResNet-50 with synchronised BatchNorm (mIoU 79.4 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.backbone = base.resnet_backbone(50, norm="sync_bn")
  c.model.num_classes = 19
  c.optimizer.schedule = "poly"
  c.total_steps = 90_000
  c.data.name = "cityscapes_semantic"
  c.data.augment = "cityscapes"
  c.data.image_size = (512, 1024)
  c.data.min_size_train = tuple(int(1024 * x * 0.1) for x in range(5, 21))
  c.data.max_size_train = 4096
  c.data.min_size_test, c.data.max_size_test = 1024, 2048
  c.data.eval_pad_size = (1024, 2048)
  c.eval.tasks = ("semantic",)
  return c
