"""PyTorch's `interpolate(mode="bilinear", align_corners=False)` (no antialiasing) as matrices.

The resize is linear along each axis, so resize(X) = R_y @ X @ R_x^T with one [out, in] matrix per
axis. Used by the decoder's attention-mask resize and by inference's resize back to the image.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch's 1-D linear interpolation, align_corners=False.

  Each output sample blends the two nearest input pixel centres, the source coordinate clamped
  at 0 as PyTorch does.
  """
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


def resize_with_matrices(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """[..., h, w] -> [..., H, W] given rows [H, h] and cols [W, w] (full float32 precision)."""
  return jnp.einsum("Hh,...hw,Ww->...HW", rows, x.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """[..., h, w] -> [..., H, W]; equals torch interpolate(bilinear, align_corners=False)."""
  rows = interpolation_matrix(x.shape[-2], int(out_hw[0]))
  cols = interpolation_matrix(x.shape[-1], int(out_hw[1]))
  return resize_with_matrices(x, jnp.asarray(rows), jnp.asarray(cols))
