"""Swin relative-position bias tables resized to another window, as the official Swin loader does.

A table for window w has (2w - 1)^2 rows (one per relative offset, row-major over (dy, dx)) and one
column per head. The authors' loader views it as a [heads, 2w-1, 2w-1] image and resizes it with
PyTorch's `interpolate(mode="bicubic", align_corners=False)`: Keys' cubic kernel with a = -0.75,
source coordinate (i + 0.5) * in / out - 0.5, neighbours clamped to the border. Written here in
numpy so that no torch is needed.
"""
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """[n] fractional offsets -> [n, 4] weights of the neighbours at -1, 0, +1, +2."""
  a = _CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float64 [out, in]: row i holds the weights of 1-D bicubic resizing for output sample i."""
  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  floor = np.floor(source)
  weights = _cubic_weights(source - floor)  # [out, 4]
  taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)  # [out, 4]
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
  return matrix


def table_window(rows: int) -> int:
  """Window w of a table with `rows` = (2w - 1)^2 rows; ValueError when there is no such w."""
  side = int(round(rows ** 0.5))
  if side * side != rows or side % 2 == 0:
    raise ValueError(f"a relative-position table has (2w - 1)^2 rows, got {rows}")
  return (side + 1) // 2


def resize_relative_position_table(table: np.ndarray, window: int) -> np.ndarray:
  """[(2w-1)^2, heads] table of any window w -> [(2 * window - 1)^2, heads], bicubic."""
  side_in, side_out = 2 * table_window(table.shape[0]) - 1, 2 * window - 1
  heads = table.shape[1]
  grid = table.astype(np.float64).T.reshape(heads, side_in, side_in)
  matrix = bicubic_matrix(side_in, side_out)
  resized = np.einsum("oi,hij,pj->hop", matrix, grid, matrix)  # [heads, out, out]
  return resized.reshape(heads, side_out * side_out).T.astype(table.dtype)
