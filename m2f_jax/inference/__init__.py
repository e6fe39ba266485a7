"""Post-processing of Mask2Former outputs: semantic, panoptic and instance results (REFERENCE.md §3)."""
from m2f_jax.inference.instance import instance_core, instance_inference
from m2f_jax.inference.panoptic import panoptic_core, panoptic_inference
from m2f_jax.inference.postprocess import PostProcessor, semantic_labels
from m2f_jax.inference.resize import interpolation_matrix, mask_resize_matrices, resize_bilinear
from m2f_jax.inference.semantic import semantic_inference

__all__ = [
    "PostProcessor", "instance_core", "instance_inference", "interpolation_matrix",
    "mask_resize_matrices", "panoptic_core", "panoptic_inference", "resize_bilinear",
    "semantic_inference", "semantic_labels",
]
