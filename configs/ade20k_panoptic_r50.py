"""ADE20K panoptic segmentation, ResNet-50, 640x640 crops (PQ 39.7 in the paper)."""
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.num_classes = 150
  c.optimizer.schedule = "poly"
  c.total_steps = 160_000
  c.data.name = "ade20k_panoptic"
  c.data.augment = "ade20k"
  c.data.image_size = (640, 640)
  c.data.min_size_train = tuple(int(640 * x * 0.1) for x in range(5, 21))
  c.data.max_size_train = 2560
  c.data.min_size_test, c.data.max_size_test = 640, 2560
  return c
