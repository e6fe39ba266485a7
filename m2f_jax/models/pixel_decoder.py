"""Mask2Former's pixel decoder: a multi-scale deformable attention encoder over res5..res3 and
one FPN step on res2 (the authors' MSDeformAttnPixelDecoder). Runs in float32 by default, as the
authors disable autocast here; with dtype bfloat16 (a memory lever) its convolutions, dense layers
and maps are bfloat16, while norm statistics, softmax, sampling locations and the deformable
sampling itself stay float32.
"""
from typing import Any, Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.models.lean_backward import GroupNorm, LayerNorm, gradients_together
from m2f_jax.models.ms_deform_attn import MSDeformAttn
from m2f_jax.models.position import sine_position_embedding

ENCODER_FEATURES = ("res5", "res4", "res3")  # low to high resolution: 1/32, 1/16, 1/8
FPN_FEATURE = "res2"

# detectron2's c2_xavier_fill: kaiming_uniform(a=1), i.e. U(+-sqrt(3 / fan_in)).
c2_xavier_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default nn.Linear bias init, U(+-1 / sqrt(fan_in)) (kept by the authors' FFN)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _group_norm(num_groups: int, dtype: Any, name: str) -> GroupNorm:
  return GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)


def _layer_norm(dtype: Any, name: str) -> LayerNorm:
  return LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


def encoder_reference_points(spatial_shapes: Tuple[Tuple[int, int], ...]) -> jnp.ndarray:
  """Pixel centres of every level, ((j + 0.5) / w_l, (i + 0.5) / h_l): [S, 2] (x, y).

  With no padding mask every valid ratio is 1, so a query's reference point is the same on
  every level.
  """
  points = []
  for height, width in spatial_shapes:
    y, x = jnp.meshgrid((jnp.arange(height, dtype=jnp.float32) + 0.5) / height,
                        (jnp.arange(width, dtype=jnp.float32) + 0.5) / width, indexing="ij")
    points.append(jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1))
  return jnp.concatenate(points, axis=0)


def resize_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """PyTorch `interpolate(mode='bilinear', align_corners=False)`, no antialiasing: [B,h,w,C] -> [B,H,W,C]."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method="linear", antialias=False)


class EncoderLayer(nn.Module):
  """Deformable self-attention + FFN (ReLU), post-norm, no dropout (authors' names)."""
  d_model: int
  n_levels: int
  n_heads: int
  n_points: int
  ffn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, src: jnp.ndarray, pos: jnp.ndarray, reference_points: jnp.ndarray,
               spatial_shapes: Tuple[Tuple[int, int], ...]) -> jnp.ndarray:
    """src [B, S, C], pos [S, C] or [B, S, C], reference_points [B, S, L, 2] -> [B, S, C] (dtype)."""
    attended = MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points,
                            dtype=self.dtype, name="self_attn")(
        src + pos, reference_points, src, spatial_shapes)
    src = _layer_norm(self.dtype, "norm1")(src + attended)
    hidden = nn.Dense(self.ffn_dim, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(self.d_model), dtype=self.dtype,
                      name="linear1")(src)
    hidden = nn.Dense(self.d_model, kernel_init=nn.initializers.xavier_uniform(),
                      bias_init=torch_linear_bias_init(self.ffn_dim), dtype=self.dtype,
                      name="linear2")(nn.relu(hidden))
    return _layer_norm(self.dtype, "norm2")(src + hidden)


def check_widths(conv_dim: int, num_heads: int, num_groups: int, name: str = "pixel decoder conv_dim") -> None:
  """Raises ValueError unless conv_dim splits into GroupNorm groups and attention heads (and sine halves)."""
  if conv_dim % num_groups:
    raise ValueError(f"{name}={conv_dim} must be divisible by num_groups={num_groups}")
  if conv_dim % num_heads or conv_dim % 2:
    raise ValueError(f"{name}={conv_dim} must be even and divisible by num_heads={num_heads}")


def _fpn_step(decoder: "PixelDecoder", res2: jnp.ndarray, finest: jnp.ndarray) -> jnp.ndarray:
  """The FPN step in `decoder`'s scope: res2 [B, H/4, W/4, C_in] and the encoder's 1/8 map
  [B, H/8, W/8, conv_dim] -> mask_features [B, H/4, W/4, mask_dim] (decoder.dtype)."""
  dtype = decoder.dtype
  lateral = nn.Conv(decoder.conv_dim, (1, 1), use_bias=False, kernel_init=c2_xavier_init,
                    dtype=dtype, name="adapter_1")(res2.astype(dtype))
  lateral = _group_norm(decoder.num_groups, dtype, "adapter_1_norm")(lateral)
  y = lateral + resize_bilinear(finest, lateral.shape[1], lateral.shape[2])
  y = nn.Conv(decoder.conv_dim, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
              kernel_init=c2_xavier_init, dtype=dtype, name="layer_1")(y)
  y = nn.relu(_group_norm(decoder.num_groups, dtype, "layer_1_norm")(y))
  return nn.Conv(decoder.mask_dim, (1, 1), kernel_init=c2_xavier_init, dtype=dtype,
                 name="mask_features")(y)


class PixelDecoder(nn.Module):
  """MSDeformAttn pixel decoder.

  Attributes:
    conv_dim: width of the encoder and FPN maps.
    mask_dim: channels of mask_features.
    num_layers: deformable encoder layers.
    num_heads: deformable attention heads.
    num_points: sampling points per head and level.
    ffn_dim: encoder FFN width.
    num_groups: GroupNorm groups.
    remat: rematerialise each encoder layer and the FPN step (jax.checkpoint): the backward pass
      recomputes their activations from their inputs. Same parameters, same numbers.
    dtype: compute dtype (float32 as the authors, or bfloat16; see the module docstring).
  """
  conv_dim: int = 256
  mask_dim: int = 256
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 1024
  num_groups: int = 32
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jnp.ndarray]) -> Tuple[jnp.ndarray, List[jnp.ndarray]]:
    """Encodes the backbone features.

    Args:
      features: 'res2'..'res5' [B, h, w, C_in] at strides 4, 8, 16, 32 (any float dtype).

    Returns:
      mask_features [B, H/4, W/4, mask_dim] and the encoder maps [B, h_l, w_l, conv_dim] at 1/32,
      1/16, 1/8 (this order), all in `dtype`.
    """
    self._check(features)
    levels = len(ENCODER_FEATURES)
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (levels, self.conv_dim))
    batch = features[FPN_FEATURE].shape[0]

    tokens, positions, spatial_shapes = [], [], []
    for i, name in enumerate(ENCODER_FEATURES):
      x = features[name].astype(self.dtype)
      x = nn.Conv(self.conv_dim, (1, 1), kernel_init=nn.initializers.xavier_uniform(),
                  dtype=self.dtype, name=f"input_proj_{i}")(x)
      x = _group_norm(self.num_groups, self.dtype, f"input_proj_{i}_norm")(x)
      _, height, width, _ = x.shape
      spatial_shapes.append((height, width))
      tokens.append(x.reshape(batch, height * width, self.conv_dim))
      pos = sine_position_embedding(height, width, self.conv_dim // 2) + level_embed[i]
      positions.append(pos.reshape(height * width, self.conv_dim))
    spatial_shapes = tuple(spatial_shapes)
    src = jnp.concatenate(tokens, axis=1)  # [B, S, C]
    pos = jnp.concatenate(positions, axis=0).astype(self.dtype)  # [S, C]
    reference = encoder_reference_points(spatial_shapes)  # [S, 2]
    reference = jnp.broadcast_to(reference[None, :, None, :], (batch, reference.shape[0], levels, 2))

    layer = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    encode = gradients_together(lambda module, *arrays: module(*arrays, spatial_shapes))
    for i in range(self.num_layers):
      src = encode(layer(self.conv_dim, levels, self.num_heads, self.num_points, self.ffn_dim,
                         dtype=self.dtype, name=f"encoder_layer_{i}"), src, pos, reference)

    multi_scale, start = [], 0
    for height, width in spatial_shapes:
      multi_scale.append(src[:, start:start + height * width].reshape(batch, height, width, self.conv_dim))
      start += height * width

    fpn = nn.remat(_fpn_step) if self.remat else _fpn_step
    return fpn(self, features[FPN_FEATURE], multi_scale[-1]), multi_scale

  def _check(self, features: Dict[str, jnp.ndarray]) -> None:
    """Raises ValueError on missing or ill-shaped backbone features or a bad width."""
    check_widths(self.conv_dim, self.num_heads, self.num_groups)
    missing = [k for k in (FPN_FEATURE,) + ENCODER_FEATURES if k not in features]
    if missing:
      raise ValueError(f"pixel decoder needs backbone features {missing}; got keys {sorted(features)}")
    for name in (FPN_FEATURE,) + ENCODER_FEATURES:
      if features[name].ndim != 4:
        raise ValueError(f"backbone feature {name!r} must be [B, h, w, C], got shape {features[name].shape}")
