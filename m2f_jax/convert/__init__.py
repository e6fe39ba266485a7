"""PyTorch Mask2Former checkpoints (transformers, the authors' detectron2) and ImageNet backbone
weights -> m2f_jax variables."""
from m2f_jax.convert.detectron2 import from_detectron2
from m2f_jax.convert.hf import from_hf
from m2f_jax.convert.imagenet_backbone import load_imagenet_backbone

__all__ = ["from_detectron2", "from_hf", "load_imagenet_backbone"]
