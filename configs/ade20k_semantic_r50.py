"""ADE20K semantic segmentation, ResNet-50, 512x512 crops (mIoU 47.2 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.num_classes = 150
  c.optimizer.schedule = "poly"
  c.total_steps = 160_000
  c.data.name = "ade20k_semantic"
  c.data.augment = "ade20k"
  c.data.image_size = (512, 512)
  c.data.min_size_train = tuple(int(512 * x * 0.1) for x in range(5, 21))
  c.data.max_size_train = 2048
  c.data.min_size_test, c.data.max_size_test = 512, 2048
  c.eval.tasks = ("semantic",)
  return c
