"""Mask2Former modules; `build_model(cfg)` is the entry point."""
from m2f_jax.models.mask2former import Mask2Former, build_model

__all__ = ["Mask2Former", "build_model"]
