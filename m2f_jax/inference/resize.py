"""Resizing mask logits back to the original image (m2f_jax.models.bilinear's matrices).

The authors' chain (upsample to the padded input, crop the valid region, resize to the original
size) folds into one matrix per axis.
"""
from typing import Sequence, Tuple

import numpy as np

from m2f_jax.models.bilinear import interpolation_matrix, resize_bilinear, resize_with_matrices  # pylint: disable=unused-import


def crop_and_resize_matrix(feature_size: int, padded_size: int, valid_size: int,
                           out_size: int) -> np.ndarray:
  """[out_size, feature_size]: upsample to `padded_size`, keep the first `valid_size` rows, then
  resize to `out_size`."""
  if not 0 < valid_size <= padded_size:
    raise ValueError(f"valid size {valid_size} must lie in 1..{padded_size} (the padded size)")
  upsample = interpolation_matrix(feature_size, padded_size)[:valid_size].astype(np.float64)
  to_original = interpolation_matrix(valid_size, out_size).astype(np.float64)
  return (to_original @ upsample).astype(np.float32)


def mask_resize_matrices(feature_hw: Sequence[int], padded_hw: Sequence[int], valid_hw: Sequence[int],
                         out_hw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """Row [H0, h] and column [W0, w] matrices of the authors' resize chain for one image."""
  rows = crop_and_resize_matrix(int(feature_hw[0]), int(padded_hw[0]), int(valid_hw[0]), int(out_hw[0]))
  cols = crop_and_resize_matrix(int(feature_hw[1]), int(padded_hw[1]), int(valid_hw[1]), int(out_hw[1]))
  return rows, cols
