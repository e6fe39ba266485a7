"""COCO instance segmentation, ResNet-50 (mask AP 43.7 in the paper).

Reproduces the authors' coco/instance-segmentation/maskformer2_R50_bs16_50ep.yaml.
"""
# ImageNet backbone: --config.model.backbone.init_from=R-50.pkl (detectron2 ImageNetPretrained/torchvision/R-50.pkl)
from configs import base


def get_config():
  c = base.get_base_config()
  c.model.num_classes = 80
  c.data.name = "coco_instance"
  c.data.segment_layers = 4   # overlapping instances kept exact in up to 4 layers
  c.eval.tasks = ("instance",)
  return c
