"""Multi-scale deformable attention (Deformable DETR), as used in Mask2Former's pixel decoder.

Shapes: B batch, S = sum of h_l * w_l value positions, Lq queries, M heads, D = channels per
head, L levels, P points per head and level. Sampling locations are (x, y) in [0, 1] of each
level's map, bilinear with zero padding in the align_corners=False convention (pixel centres at
+0.5): the authors' CUDA kernel and PyTorch's `grid_sample` behave this way.
"""
import functools
import math
from typing import Any, Sequence, Tuple

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


def _bilinear_corners(x: jnp.ndarray, y: jnp.ndarray, height: int, width: int):
  """Corner indices and weights of bilinear sampling with zero padding.

  Args:
    x: [...] x in [0, 1] of a [height, width] map.
    y: [...] y, the same shape.
    height: map height.
    width: map width.

  Returns:
    flat_index int32 [4, ...] (y * width + x, clipped into the map) and weight float32 [4, ...]
    (bilinear weight, 0 for corners outside the map), corners ordered (y0,x0), (y0,x1), (y1,x0),
    (y1,x1).
  """
  x = x * width - 0.5
  y = y * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1])
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1])
  weight = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
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
    index, corner_weight = _bilinear_corners(locations[..., 0], locations[..., 1], height, width)
    for corner in range(4):  # index, corner_weight: [4, B, M, Lq, P]
      idx = index[corner].reshape(b, heads, -1, 1)
      picked = jnp.take_along_axis(level_value, idx, axis=2).reshape(b, heads, lq, -1, dim)
      w = corner_weight[corner] * weights  # [B, M, Lq, P]
      out = out + jnp.einsum("bmqpd,bmqp->bmqd", picked, w)
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, lq, heads * dim)


def ms_deform_sample(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                     sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray) -> jnp.ndarray:
  """`ms_deform_sample_planar` with `ms_deform_sample_reference`'s contract (the same result)."""
  value, sampling_locations, attention_weights = _checked_float32(
      value, spatial_shapes, sampling_locations, attention_weights)
  b, total, heads, dim = value.shape
  return ms_deform_sample_planar(value.reshape(b, total, heads * dim), spatial_shapes,
                                 jnp.transpose(sampling_locations, (0, 3, 4, 5, 2, 1)),
                                 jnp.transpose(attention_weights, (0, 3, 4, 2, 1)))


def ms_deform_sample_planar(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                            locations: jnp.ndarray, attention: jnp.ndarray) -> jnp.ndarray:
  """Deformable sampling as one weighted gather over all corners, points and levels.

  Each image's values are an [S, M * D] table; every (level, point, corner) k and (head, query)
  n = m * Lq + q becomes one position and one weight (bilinear weight x attention weight), so the
  op is a weighted sum of K = L * P * 4 gathered slices per n (head m's D columns at a position).
  Every per-sample array has n minor (positions and weights [K, B, M * Lq]): TPU tiles pad the
  minor dimension to 128, and with the heads (8), points (4) or (x, y) (2) minor, the arrays an
  R50 step keeps for its backward pass at 1024x1024 grew 16-64x. The gather is vmapped over the
  batch rather than flattened into one table, so with the batch sharded over devices each device
  gathers from its own images only.

  Args:
    value: [B, S, M * D], the heads' values side by side (float32 or bfloat16).
    spatial_shapes: L static (h_l, w_l) pairs.
    locations: [B, L, P, 2, M, Lq] (x, y) in [0, 1].
    attention: [B, L, P, M, Lq].

  Returns:
    float32 [B, Lq, M * D].
  """
  b, _, channels = value.shape
  _, _, _, _, heads, lq = locations.shape
  dim = channels // heads
  out = _deform_sample(value, locations.astype(jnp.float32), attention.astype(jnp.float32),
                       tuple(map(tuple, spatial_shapes)))  # [B, M * Lq, D]
  return jnp.swapaxes(out.reshape(b, heads, lq, dim), 1, 2).reshape(b, lq, heads * dim)


def _sample_weights(locations: jnp.ndarray, attention: jnp.ndarray,
                    spatial_shapes: SpatialShapes) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Each sample's weight and position in the image's values.

  Args:
    locations: [B, L, P, 2, M, Lq] (x, y) in [0, 1].
    attention: [B, L, P, M, Lq].
    spatial_shapes: L static (h_l, w_l) pairs.

  Returns:
    weight float32 and position int32, both [K, B, M * Lq] with k = (level, corner, point).
  """
  b, levels, points, _, heads, lq = locations.shape
  locations = locations.reshape(b, levels, points, 2, heads * lq)
  attention = attention.reshape(b, levels, points, heads * lq)
  positions, weights = [], []
  start = 0
  for level, (height, width) in enumerate(spatial_shapes):
    index, corner_weight = _bilinear_corners(locations[:, level, :, 0], locations[:, level, :, 1],
                                             height, width)  # [4, B, P, M * Lq]
    positions.append(index + start)
    weights.append(corner_weight * attention[None, :, level])
    start += height * width
  by_sample = lambda parts: jnp.swapaxes(jnp.concatenate(parts, axis=0), 1, 2).reshape(
      levels * 4 * points, b, heads * lq)
  return by_sample(weights), by_sample(positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _deform_sample(table: jnp.ndarray, locations: jnp.ndarray, attention: jnp.ndarray,
                   spatial_shapes: SpatialShapes) -> jnp.ndarray:
  """sum_k weight[k, b, n] * table[b, position[k, b, n], head m's D columns], n = m * Lq + q:
  table [B, S, M * D], locations [B, L, P, 2, M, Lq], attention [B, L, P, M, Lq] -> float32
  [B, M * Lq, D].

  Forward and backward run one sample k at a time (a scan over K), so the [K, N, D] samples
  (about 1 GB per 1024x1024 image and encoder layer) never exist. The backward pass keeps only
  the table (in its own dtype), the locations and the attention, and derives the positions and
  weights again: kept, they and the bilinear terms behind them took 270 MiB per encoder layer of
  an R50 step (2 images of 1024x1024), against 47 MiB for the locations and attention.
  """
  heads = locations.shape[4]
  weight, position = _sample_weights(locations, attention, spatial_shapes)
  return jax.vmap(_weighted_slices, in_axes=(0, 1, 1, None))(table, position, weight, heads)


def _deform_sample_fwd(table, locations, attention, spatial_shapes):
  return _deform_sample(table, locations, attention, spatial_shapes), (table, locations, attention)


def _deform_sample_bwd(spatial_shapes, residuals, grad):
  """d table and d weight per image (`_slice_grads`), d weight taken back to the locations and
  attention through the weights' own VJP."""
  table, locations, attention = residuals
  heads = locations.shape[4]
  # The barrier keeps XLA from merging this with the forward pass's weights (and keeping those).
  locations, attention = jax.lax.optimization_barrier((locations, attention))
  weight, weight_vjp, position = jax.vjp(
      lambda l, a: _sample_weights(l, a, spatial_shapes), locations, attention, has_aux=True)
  grad_table, grad_weight = jax.vmap(_slice_grads, in_axes=(0, 1, 1, 0, None), out_axes=(0, 1))(
      table, position, weight, grad, heads)
  grad_locations, grad_attention = weight_vjp(grad_weight)
  return grad_table.astype(table.dtype), grad_locations, grad_attention


_deform_sample.defvjp(_deform_sample_fwd, _deform_sample_bwd)


_SLICES = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                         start_index_map=(0, 1))
_SLICE_UPDATES = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                                 scatter_dims_to_operand_dims=(0, 1))
_IN_BOUNDS = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


def _slice_starts(position: jnp.ndarray, heads: int, dim: int) -> jnp.ndarray:
  """int32 [N, 2] (position, first column of head m) for n = m * (N / heads) + q."""
  columns = jnp.repeat(jnp.arange(heads, dtype=jnp.int32) * dim, position.shape[0] // heads)
  return jnp.stack([position, columns], axis=-1)


def _weighted_slices(table: jnp.ndarray, position: jnp.ndarray, weight: jnp.ndarray,
                     heads: int) -> jnp.ndarray:
  """One image: sum_k weight[k] * [D]-slices of table [S, M * D] at position[k]; [K, N] -> f32 [N, D].

  Each sample gathers [1, D] slices of the table itself: the backward pass would keep a
  [S * M, D] view of it, and TPU tiles pad its D-wide minor dimension to 128."""
  dim = table.shape[1] // heads

  def add_sample(total, sample):
    sample_position, sample_weight = sample
    picked = jax.lax.gather(table, _slice_starts(sample_position, heads, dim), _SLICES, (1, dim),
                            mode=_IN_BOUNDS)
    return total + picked.astype(jnp.float32) * sample_weight[:, None], None

  total = jnp.zeros((position.shape[1], dim), jnp.float32)
  return jax.lax.scan(add_sample, total, (position, weight))[0]


def _slice_grads(table: jnp.ndarray, position: jnp.ndarray, weight: jnp.ndarray, grad: jnp.ndarray,
                 heads: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """One image, `_weighted_slices`' gradients for its output gradient grad [N, D]: d table f32
  [S, M * D] (scatter-add of weight * grad at the slices) and d weight [K, N] (<slice, grad>)."""
  dim = table.shape[1] // heads

  def sample_grads(grad_table, sample):
    sample_position, sample_weight = sample
    starts = _slice_starts(sample_position, heads, dim)
    picked = jax.lax.gather(table, starts, _SLICES, (1, dim), mode=_IN_BOUNDS)
    grad_table = jax.lax.scatter_add(grad_table, starts, sample_weight[:, None] * grad,
                                     _SLICE_UPDATES, mode=_IN_BOUNDS)
    return grad_table, jnp.sum(picked.astype(jnp.float32) * grad, axis=1)

  return jax.lax.scan(sample_grads, jnp.zeros(table.shape, jnp.float32), (position, weight))


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
    dtype: compute dtype of the projections; locations, softmax and sampling stay float32.
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  dtype: Any = jnp.float32

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
      [B, Lq, C] in `dtype`.
    """
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
    if len(spatial_shapes) != self.n_levels:
      raise ValueError(f"MSDeformAttn has n_levels={self.n_levels} but got {len(spatial_shapes)} spatial shapes")
    b, lq, _ = query.shape
    heads, levels, points = self.n_heads, self.n_levels, self.n_points
    bias = sampling_offsets_bias_init(heads, levels, points)
    value = nn.Dense(self.d_model, kernel_init=nn.initializers.xavier_uniform(),
                     dtype=self.dtype, name="value_proj")(value_input)
    # Offsets and attention weights go to the planar layout of `ms_deform_sample_planar` straight
    # from the projections ([B, F, Lq], the queries minor), so no array has heads, points or (x, y)
    # as its minor dimension.
    offsets = nn.Dense(heads * levels * points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.constant(bias), dtype=self.dtype,
                       name="sampling_offsets")(query)
    offsets = jnp.swapaxes(offsets, 1, 2).reshape(b, heads, levels, points, 2, lq)
    offsets = jnp.transpose(offsets, (0, 2, 3, 4, 1, 5)).astype(jnp.float32)  # [B, L, P, 2, M, Lq]
    logits = nn.Dense(heads * levels * points, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, name="attention_weights")(query)
    logits = jnp.swapaxes(logits, 1, 2).reshape(b, heads, levels * points, lq)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=2)
    weights = jnp.transpose(weights.reshape(b, heads, levels, points, lq), (0, 2, 3, 1, 4))
    normaliser = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)  # [L, 2] (x, y)
    reference = jnp.transpose(reference_points.astype(jnp.float32), (0, 2, 3, 1))  # [B, L, 2, Lq]
    locations = (reference[:, :, None, :, None, :]
                 + offsets / normaliser[None, :, None, :, None, None])  # [B, L, P, 2, M, Lq]
    sampled = ms_deform_sample_planar(value, tuple(spatial_shapes), locations, weights)
    return nn.Dense(self.d_model, kernel_init=nn.initializers.xavier_uniform(),
                    dtype=self.dtype, name="output_proj")(sampled)
