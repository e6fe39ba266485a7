"""Bilinear resizing of mask logits back to the original image, as separable linear maps.

PyTorch's `interpolate(mode="bilinear", align_corners=False)` (no antialiasing) is linear along each
axis, so it is a matrix product: resize(X) = R_y @ X @ R_x^T. The authors' chain (upsample to the
padded input, crop the valid region, resize to the original size) then folds into one matrix per axis.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch's 1-D linear interpolation, align_corners=False."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def crop_and_resize_matrix(feature_size: int, padded_size: int, valid_size: int,
                           out_size: int) -> np.ndarray:
  """[out_size, feature_size]: upsample to `padded_size`, keep the first `valid_size` rows, then
  resize to `out_size`."""
  if not 0 < valid_size <= padded_size:
    raise ValueError(f"valid size {valid_size} must lie in 1..{padded_size} (the padded size)")
  upsample = interpolation_matrix(feature_size, padded_size)[:valid_size].astype(np.float64)
  to_original = interpolation_matrix(valid_size, out_size).astype(np.float64)
  return (to_original @ upsample).astype(np.float32)


def resize_with_matrices(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """[..., h, w] -> [..., H, W] given rows [H, h] and cols [W, w] (full float32 precision)."""
  return jnp.einsum("Hh,...hw,Ww->...HW", rows, x.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """[..., h, w] -> [..., H, W]; equals torch interpolate(bilinear, align_corners=False)."""
  rows = interpolation_matrix(x.shape[-2], int(out_hw[0]))
  cols = interpolation_matrix(x.shape[-1], int(out_hw[1]))
  return resize_with_matrices(x, jnp.asarray(rows), jnp.asarray(cols))


def mask_resize_matrices(feature_hw: Sequence[int], padded_hw: Sequence[int], valid_hw: Sequence[int],
                         out_hw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """Row [H0, h] and column [W0, w] matrices of the authors' resize chain for one image."""
  rows = crop_and_resize_matrix(int(feature_hw[0]), int(padded_hw[0]), int(valid_hw[0]), int(out_hw[0]))
  cols = crop_and_resize_matrix(int(feature_hw[1]), int(padded_hw[1]), int(valid_hw[1]), int(out_hw[1]))
  return rows, cols
