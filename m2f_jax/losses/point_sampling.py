"""Bilinear point sampling of mask logits and of segment-id targets, and uncertainty sampling.

Points are normalised (x, y) in [0, 1]^2 over the whole map, sampled the way PyTorch's
`grid_sample(align_corners=False, padding_mode='zeros')` samples `2 * point - 1` (the authors'
`point_sample`): pixel centres sit at (i + 0.5) / size, and neighbours outside the map count as 0.
Everything is float32.
"""
from typing import List, Tuple

import jax
import jax.numpy as jnp

Corner = Tuple[jax.Array, jax.Array]


def bilinear_corners(points: jax.Array, height: int, width: int) -> List[Corner]:
  """The four neighbour pixels of each point and their bilinear weights.

  Callers sum over the corners one at a time, so no [..., 4] array is ever built.

  Args:
    points: float [..., 2] normalised (x, y).
    height: map height.
    width: map width.

  Returns:
    Four (flat_index int32 [...], weight float32 [...]) pairs, NW, NE, SW, SE: flat_index =
    row * width + column clipped into the map, weight zero for a neighbour outside the map.
  """
  points = points.astype(jnp.float32)
  grid = 2.0 * points - 1.0  # the [-1, 1] grid that grid_sample receives
  x = ((grid[..., 0] + 1.0) * width - 1.0) * 0.5
  y = ((grid[..., 1] + 1.0) * height - 1.0) * 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  x1 = x0 + 1.0
  y1 = y0 + 1.0
  corners = []
  for cx, cy, weight in [(x0, y0, (x1 - x) * (y1 - y)), (x1, y0, (x - x0) * (y1 - y)),
                         (x0, y1, (x1 - x) * (y - y0)), (x1, y1, (x - x0) * (y - y0))]:
    inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
    column = jnp.clip(cx, 0, width - 1).astype(jnp.int32)
    row = jnp.clip(cy, 0, height - 1).astype(jnp.int32)
    corners.append((row * width + column, jnp.where(inside, weight, 0.0)))
  return corners


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
  """Samples every map at the same points, points major.

  Each corner gathers whole rows of the maps transposed to [h * w, N]: on CPU several times
  faster than gathering single values into [N, P] and transposing.

  Args:
    maps: [N, h, w] (cast to float32).
    points: [P, 2] shared by all maps.

  Returns:
    float32 [P, N].
  """
  n, h, w = maps.shape
  table = maps.astype(jnp.float32).reshape(n, h * w).T  # [h * w, N]
  result = 0.0
  for index, weight in bilinear_corners(points, h, w):
    result = result + jnp.take(table, index, axis=0) * weight[:, None]
  return result


def point_sample_each(maps: jax.Array, points: jax.Array) -> jax.Array:
  """Samples map n at its own points[n].

  Args:
    maps: [N, h, w] (cast to float32).
    points: [N, P, 2].

  Returns:
    float32 [N, P].
  """
  n, h, w = maps.shape
  flat = maps.astype(jnp.float32).reshape(n, h * w)
  result = 0.0
  for index, weight in bilinear_corners(points, h, w):
    result = result + jnp.take_along_axis(flat, index, axis=1) * weight
  return result


def sample_targets(segment_ids: jax.Array, points: jax.Array, slots: jax.Array) -> jax.Array:
  """Samples binary target masks straight from the compact segment-id encoding.

  Target slot m covers the pixels where any layer has value m + 1. The result equals bilinear
  `grid_sample` of the binary mask [H, W] (soft at edges), but no [N, H, W] array is built.

  Args:
    segment_ids: int [S, H, W].
    points: [P, 2] shared by all targets, or [N, P, 2] one set per target.
    slots: int [N] target slots to sample.

  Returns:
    float32 [N, P].
  """
  s, h, w = segment_ids.shape
  flat = segment_ids.reshape(s, h * w)
  target_ids = (slots.astype(segment_ids.dtype) + 1)[:, None]  # [N, 1]
  result = 0.0
  for index, weight in bilinear_corners(points, h, w):
    values = jnp.take(flat, index, axis=1)  # [S, P] or [S, N, P]
    if points.ndim == 2:
      values = values[:, None, :]
    inside = jnp.any(values == target_ids[None], axis=0)  # [N, P]
    result = result + jnp.where(inside, weight, 0.0)
  return result


def num_points_split(num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> Tuple[int, int, int]:
  """(oversampled, most uncertain kept, fresh uniform) point counts, as the authors round them."""
  if num_points < 1:
    raise ValueError(f"loss.num_points must be >= 1, got {num_points}")
  if oversample_ratio < 1:
    raise ValueError(f"loss.oversample_ratio must be >= 1, got {oversample_ratio}")
  if not 0.0 <= importance_sample_ratio <= 1.0:
    raise ValueError(
        f"loss.importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
  num_oversampled = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  return num_oversampled, num_uncertain, num_points - num_uncertain


def smallest_k_positions(values: jax.Array, k: int) -> jax.Array:
  """Where each entry goes among the k smallest of its row, as `lax.top_k(-values, k)` picks them.

  Ties go to the lower index. A bisection on the float32 bit patterns (ordered like the values
  when they are >= 0) finds each row's k-th smallest value in 31 counting passes: several times
  faster than top_k on CPU when k is a sizeable fraction of the row. One cumulative count then
  numbers the entries below it (in index order) and, after them, the ties that still fit.

  Args:
    values: float32 [N, n], >= 0.
    k: how many to keep per row, 0 < k <= n.

  Returns:
    int32 [N, n]: a distinct position in [0, k) for each kept entry, k for the others.
  """
  keys = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

  def halve(_, bounds):  # invariant: each row's k-th smallest key lies in [low, high]
    low, high = bounds
    middle = low + (high - low) // 2
    enough = jnp.sum(keys <= middle, axis=-1, keepdims=True) >= k
    return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

  rows = values.shape[:-1] + (1,)
  start = (jnp.zeros(rows, jnp.int32), jnp.full(rows, jnp.iinfo(jnp.int32).max, jnp.int32))
  _, kth = jax.lax.fori_loop(0, 31, halve, start)  # [N, 1]
  below, tie = keys < kth, keys == kth
  if values.shape[-1] < 1 << 16:  # both running counts in one uint32 cumsum, 16 bits each
    counts = jnp.cumsum(below.astype(jnp.uint32) + (tie.astype(jnp.uint32) << 16), axis=-1)
    below_count, tie_count = (counts & 0xFFFF).astype(jnp.int32), (counts >> 16).astype(jnp.int32)
  else:
    below_count = jnp.cumsum(below, axis=-1, dtype=jnp.int32)
    tie_count = jnp.cumsum(tie, axis=-1, dtype=jnp.int32)
  below_rank = below_count - 1
  tie_rank = below_count[..., -1:] + tie_count - 1
  position = jnp.where(below, below_rank, jnp.where(tie, tie_rank, k))
  return jnp.minimum(position, k)


SELECTIONS = ("top_k", "bisection")


def importance_points(maps: jax.Array, oversampled: jax.Array, fresh: jax.Array,
                      num_uncertain: int, selection: str = "top_k") -> jax.Array:
  """Uncertainty-based point selection for each predicted map.

  Keeps the `num_uncertain` candidates whose sampled logit is closest to 0 (uncertainty -|logit|)
  and appends the fresh uniform points. Both selections keep the same candidates (ties to the
  lower index), in another order: the losses on them do not depend on it. 'top_k' is
  `lax.top_k`, the accelerators' choice; 'bisection' (`smallest_k_positions`) is faster on CPU.
  Carries no gradient.

  Args:
    maps: mask logits [N, h, w], one per (query, target) pair.
    oversampled: candidate points [N, P_over, 2].
    fresh: uniform points [N, P - num_uncertain, 2].
    num_uncertain: how many candidates to keep.
    selection: 'top_k' or 'bisection'.

  Returns:
    float32 [N, P, 2].
  """
  if selection not in SELECTIONS:
    raise ValueError(f"loss.uncertain_selection must be one of {SELECTIONS}, got {selection!r}")
  if num_uncertain == 0:
    return fresh.astype(jnp.float32)
  oversampled = oversampled.astype(jnp.float32)
  maps = jax.lax.stop_gradient(maps)
  uncertainty = jnp.abs(point_sample_each(maps, oversampled))  # [N, P_over], small = uncertain
  if selection == "top_k":
    _, index = jax.lax.top_k(-uncertainty, num_uncertain)
    chosen = jnp.take_along_axis(oversampled, index[..., None], axis=1)
  else:
    position = smallest_k_positions(uncertainty, num_uncertain)
    pairs = maps.shape[0]
    # One flat scatter; the candidates not kept land past the end and are dropped.
    target = jnp.arange(pairs)[:, None] * num_uncertain + position
    target = jnp.where(position < num_uncertain, target, pairs * num_uncertain)
    chosen = jnp.zeros((pairs * num_uncertain, 2), jnp.float32).at[target.reshape(-1)].set(
        oversampled.reshape(-1, 2), mode="drop").reshape(pairs, num_uncertain, 2)
  return jnp.concatenate([chosen, fresh.astype(jnp.float32)], axis=1)
