"""Multi-scale deformable attention (Deformable DETR), as used in Mask2Former's pixel decoder.

Shapes: B batch, S = sum of h_l * w_l value positions, Lq queries, M heads, D = channels per
head, L levels, P points per head and level. Sampling locations are (x, y) in [0, 1] of each
level's map, bilinear with zero padding in the align_corners=False convention (pixel centres at
+0.5): the authors' CUDA kernel and PyTorch's `grid_sample` behave this way.
"""
import math
from typing import Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SpatialShapes = Sequence[Tuple[int, int]]


def _checked_float32(value, spatial_shapes, sampling_locations, attention_weights):
  """The op's inputs in float32; raises ValueError when their shapes disagree with each other."""
  total = sum(h * w for h, w in spatial_shapes)
  if value.ndim != 4 or value.shape[1] != total:
    raise ValueError(f"value must be [B, S={total}, heads, D] for spatial_shapes {tuple(spatial_shapes)}, "
                     f"got {value.shape}")
  b, _, heads, _ = value.shape
  expected = (b, sampling_locations.shape[1], heads, len(spatial_shapes))
  if sampling_locations.ndim != 6 or sampling_locations.shape[:4] != expected or sampling_locations.shape[-1] != 2:
    raise ValueError(f"sampling_locations must be [B, Lq, heads, levels, points, 2] = {expected + ('P', 2)}, "
                     f"got {sampling_locations.shape}")
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"attention_weights must be {sampling_locations.shape[:-1]}, got {attention_weights.shape}")
  return (value.astype(jnp.float32), sampling_locations.astype(jnp.float32),
          attention_weights.astype(jnp.float32))


def _bilinear_corners(locations: jnp.ndarray, height: int, width: int):
  """Corner indices and weights of bilinear sampling with zero padding.

  Args:
    locations: [..., 2] (x, y) in [0, 1] of a [height, width] map.
    height: map height.
    width: map width.

  Returns:
    flat_index int32 [..., 4] (y * width + x, clipped into the map) and weight float32 [..., 4]
    (bilinear weight, 0 for corners outside the map), corners ordered (y0,x0), (y0,x1), (y1,x0),
    (y1,x1).
  """
  x = locations[..., 0] * width - 0.5
  y = locations[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  weight = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=-1)
  inside = (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)
  xi = jnp.clip(xs, 0, width - 1).astype(jnp.int32)
  yi = jnp.clip(ys, 0, height - 1).astype(jnp.int32)
  return yi * width + xi, jnp.where(inside, weight, 0.0)


def ms_deform_sample_reference(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                               sampling_locations: jnp.ndarray,
                               attention_weights: jnp.ndarray) -> jnp.ndarray:
  """Plain per-level, per-corner deformable sampling (the readable definition).

  Args:
    value: [B, S, M, D] values of all levels, flattened row-major per level, levels concatenated.
    spatial_shapes: L static (h_l, w_l) pairs.
    sampling_locations: [B, Lq, M, L, P, 2] (x, y) in [0, 1] (values outside sample zeros).
    attention_weights: [B, Lq, M, L, P].

  Returns:
    float32 [B, Lq, M * D].
  """
  value, sampling_locations, attention_weights = _checked_float32(
      value, spatial_shapes, sampling_locations, attention_weights)
  b, _, heads, dim = value.shape
  lq = sampling_locations.shape[1]
  out = jnp.zeros((b, heads, lq, dim), jnp.float32)
  start = 0
  for level, (height, width) in enumerate(spatial_shapes):
    level_value = jnp.transpose(value[:, start:start + height * width], (0, 2, 1, 3))  # [B, M, hw, D]
    start += height * width
    locations = jnp.transpose(sampling_locations[:, :, :, level], (0, 2, 1, 3, 4))  # [B, M, Lq, P, 2]
    weights = jnp.transpose(attention_weights[:, :, :, level], (0, 2, 1, 3))  # [B, M, Lq, P]
    index, corner_weight = _bilinear_corners(locations, height, width)  # [B, M, Lq, P, 4]
    for corner in range(4):
      idx = index[..., corner].reshape(b, heads, -1, 1)
      picked = jnp.take_along_axis(level_value, idx, axis=2).reshape(b, heads, lq, -1, dim)
      w = corner_weight[..., corner] * weights  # [B, M, Lq, P]
      out = out + jnp.einsum("bmqpd,bmqp->bmqd", picked, w)
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, lq, heads * dim)


def ms_deform_sample(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                     sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray) -> jnp.ndarray:
  """Deformable sampling as one weighted row gather over all corners, points and levels.

  Same contract as `ms_deform_sample_reference`. Each image's values are viewed as an [S * M, D]
  table; every (query, head, level, point, corner) becomes one row index and one weight (bilinear
  weight x attention weight), so the op is a weighted sum of L * P * 4 gathered rows. The gather
  is vmapped over the batch rather than flattened into one [B * S * M, D] table, so with the batch
  sharded over devices each device gathers from its own images only (a flat table's rows could
  point anywhere, and the partitioner would all-gather every image's values to every device).

  Returns:
    float32 [B, Lq, M * D].
  """
  value, sampling_locations, attention_weights = _checked_float32(
      value, spatial_shapes, sampling_locations, attention_weights)
  b, total, heads, dim = value.shape
  lq = sampling_locations.shape[1]
  indices, weights = [], []
  start = 0
  for level, (height, width) in enumerate(spatial_shapes):
    index, corner_weight = _bilinear_corners(sampling_locations[:, :, :, level], height, width)
    indices.append(index + start)  # [B, Lq, M, P, 4]
    weights.append(corner_weight * attention_weights[:, :, :, level, :, None])
    start += height * width
  position = jnp.stack(indices, axis=3).reshape(b, lq, heads, -1)  # [B, Lq, M, K], K = L * P * 4
  weight = jnp.stack(weights, axis=3).reshape(b, lq, heads, -1)
  head_offset = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
  rows = position * heads + head_offset  # row of the image's value.reshape(S * M, D)
  out = jax.vmap(_gather_weighted_sum)(value.reshape(b, total * heads, dim), rows, weight)
  return out.reshape(b, lq, heads * dim)


def _by_sample(rows: jnp.ndarray, weight: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """[..., K] -> [K, ...]: one scan step per sample."""
  return jnp.moveaxis(rows, -1, 0), jnp.moveaxis(weight, -1, 0)


def _weighted_rows(table: jnp.ndarray, rows: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  def add_sample(total, sample):
    sample_rows, sample_weight = sample
    return total + table.at[sample_rows].get(mode="promise_in_bounds") * sample_weight[..., None], None

  total = jnp.zeros(rows.shape[:-1] + table.shape[1:], table.dtype)
  return jax.lax.scan(add_sample, total, _by_sample(rows, weight))[0]


@jax.custom_vjp
def _gather_weighted_sum(table: jnp.ndarray, rows: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """sum_k weight[..., k] * table[rows[..., k]]: table [N, D], rows and weight [Lq, M, K] -> [Lq, M, D].

  Forward and backward run one sample k at a time (a scan over K), so the [Lq, M, K, D]
  samples (about 1 GB per 1024x1024 image and encoder layer) never exist; on CPU this is also
  2-3x faster than one big gather. (jax.checkpoint cannot be relied on here: XLA:CPU merges the
  recomputed gather with the forward one and keeps it alive.)
  """
  return _weighted_rows(table, rows, weight)


def _gather_weighted_sum_fwd(table, rows, weight):
  return _weighted_rows(table, rows, weight), (table, rows, weight)


def _gather_weighted_sum_bwd(residuals, grad):
  """d table: scatter-add of weight * grad at the rows; d weight: <table[rows], grad>."""
  table, rows, weight = residuals

  def sample_grads(grad_table, sample):
    sample_rows, sample_weight = sample
    picked = table.at[sample_rows].get(mode="promise_in_bounds")  # [Lq, M, D]
    grad_table = grad_table.at[sample_rows].add(sample_weight[..., None] * grad,
                                                mode="promise_in_bounds")
    return grad_table, jnp.sum(picked * grad, axis=-1)

  grad_table, grad_weight = jax.lax.scan(sample_grads, jnp.zeros_like(table),
                                         _by_sample(rows, weight))
  return grad_table, None, jnp.moveaxis(grad_weight, 0, -1)


_gather_weighted_sum.defvjp(_gather_weighted_sum_fwd, _gather_weighted_sum_bwd)


def sampling_offsets_bias_init(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
  """The authors' initial sampling offsets: [M * L * P * 2] (x, y) pixel offsets.

  Head m points along (cos, sin)(2 pi m / M) scaled so its larger component is 1, times the
  point index + 1; the same for every level.
  """
  thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  scale = np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
  grid = np.broadcast_to(grid[:, None, None, :], (n_heads, n_levels, n_points, 2)) * scale
  return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention.

  Attributes:
    d_model: channels C of queries and values (divisible by n_heads).
    n_levels: feature levels L.
    n_heads: heads M.
    n_points: sampling points P per head and level.
    sample_fn: the sampling op (`ms_deform_sample` or `ms_deform_sample_reference`).
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  sample_fn: Callable[..., jnp.ndarray] = ms_deform_sample

  @nn.compact
  def __call__(self, query: jnp.ndarray, reference_points: jnp.ndarray, value_input: jnp.ndarray,
               spatial_shapes: SpatialShapes) -> jnp.ndarray:
    """Attends from each query to P points per head around its reference point on every level.

    Args:
      query: [B, Lq, C] (features + position embedding).
      reference_points: [B, Lq, L, 2] (x, y) in [0, 1] per level.
      value_input: [B, S, C], levels flattened and concatenated in `spatial_shapes` order.
      spatial_shapes: L static (h_l, w_l) pairs.

    Returns:
      float32 [B, Lq, C].
    """
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
    if len(spatial_shapes) != self.n_levels:
      raise ValueError(f"MSDeformAttn has n_levels={self.n_levels} but got {len(spatial_shapes)} spatial shapes")
    b, lq, _ = query.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points
    bias = sampling_offsets_bias_init(heads, levels, points)
    value = nn.Dense(self.d_model, kernel_init=nn.initializers.xavier_uniform(),
                     name="value_proj")(value_input)
    value = value.reshape(b, value.shape[1], heads, self.d_model // heads)
    offsets = nn.Dense(heads * levels * points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.constant(bias), name="sampling_offsets")(query)
    offsets = offsets.reshape(b, lq, heads, levels, points, 2)
    logits = nn.Dense(heads * levels * points, kernel_init=nn.initializers.zeros,
                      name="attention_weights")(query)
    weights = jax.nn.softmax(logits.reshape(b, lq, heads, levels * points).astype(jnp.float32), axis=-1)
    weights = weights.reshape(b, lq, heads, levels, points)
    normaliser = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # [L, 2] (x, y)
    locations = (reference_points[:, :, None, :, None, :].astype(jnp.float32)
                 + offsets.astype(jnp.float32) / normaliser[None, None, None, :, None, :])
    sampled = self.sample_fn(value, tuple(spatial_shapes), locations, weights)
    return nn.Dense(self.d_model, kernel_init=nn.initializers.xavier_uniform(),
                    name="output_proj")(sampled)
