"""ResNet backbone (bottleneck blocks, torchvision style) with frozen or synchronised BatchNorm.

Parameter tree (mirrors the authors' detectron2 names, see `m2f_jax/convert`):
  stem/conv1/{kernel, norm/{scale, bias}}
  res{2..5}/block{i}/{conv1, conv2, conv3, shortcut}/{kernel, norm/{scale, bias}}
and the same paths ending in norm/{mean, var} in 'batch_stats'.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("frozen_bn", "sync_bn")


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with one parameter tree for two behaviours.

  'frozen_bn': the stored statistics always, scale/bias get no gradient (detectron2's
  FrozenBatchNorm2d). 'sync_bn': batch statistics over every axis but the last when
  `train` (under jit on a global batch this is the global batch: synchronised BN), the
  running statistics updated with PyTorch's momentum convention, running statistics at eval.

  Attributes:
    mode: 'frozen_bn' or 'sync_bn'.
    eps: added to the variance.
    momentum: PyTorch convention: running = (1 - momentum) * running + momentum * batch.
    dtype: compute dtype of the output.
  """
  mode: str = "frozen_bn"
  eps: float = 1e-5
  momentum: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[..., C] -> [..., C]."""
    if self.mode not in NORMS:
      raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.mode!r}")
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

    if self.mode == "frozen_bn":
      scale = jax.lax.stop_gradient(scale)
      bias = jax.lax.stop_gradient(bias)
      mean, var = running_mean.value, running_var.value
    elif train:
      reduce_axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=reduce_axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      if not self.is_initializing():
        count = int(np.prod([x.shape[a] for a in reduce_axes]))
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = (1.0 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1.0 - self.momentum) * running_var.value + self.momentum * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value

    multiplier = scale * jax.lax.rsqrt(var + self.eps)
    offset = bias - mean * multiplier
    return x.astype(self.dtype) * multiplier.astype(self.dtype) + offset.astype(self.dtype)


class ConvNorm(nn.Module):
  """Convolution without bias (PyTorch padding k // 2) followed by BatchNorm named 'norm'.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: spatial stride.
    norm: 'frozen_bn' or 'sync_bn'.
    norm_eps: BatchNorm epsilon.
    dtype: compute dtype.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[B, H, W, Cin] -> [B, ceil(H / stride), ceil(W / stride), features]."""
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        (k, k, x.shape[-1], self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=[(k // 2, k // 2)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return BatchNorm(self.norm, self.norm_eps, dtype=self.dtype, name="norm")(y, train)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 residual block; projection shortcut when `project`.

  Attributes:
    width: channels of the 1x1 / 3x3 convs; the block outputs 4 * width.
    stride: stride of the 3x3 conv and of the shortcut.
    project: whether the shortcut is a 1x1 conv + norm (first block of a stage).
    norm, norm_eps, dtype: as in ConvNorm.
  """
  width: int
  stride: int = 1
  project: bool = False
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[B, H, W, Cin] -> [B, H / stride, W / stride, 4 * width]."""
    def conv(features: int, kernel_size: int, stride: int, name: str) -> ConvNorm:
      return ConvNorm(features, kernel_size, stride, self.norm, self.norm_eps, self.dtype, name=name)

    y = nn.relu(conv(self.width, 1, 1, "conv1")(x, train))
    y = nn.relu(conv(self.width, 3, self.stride, "conv2")(y, train))
    y = conv(4 * self.width, 1, 1, "conv3")(y, train)
    shortcut = conv(4 * self.width, 1, self.stride, "shortcut")(x, train) if self.project else x
    return nn.relu(y + shortcut.astype(y.dtype))


class ResStage(nn.Module):
  """`num_blocks` bottlenecks; the first one strides and projects its shortcut. With `remat`
  each block keeps only its input for the backward pass and recomputes the rest there."""
  num_blocks: int
  width: int
  stride: int
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[B, H, W, Cin] -> [B, H / stride, W / stride, 4 * width]."""
    block = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    for i in range(self.num_blocks):
      x = block(self.width, self.stride if i == 0 else 1, project=(i == 0), norm=self.norm,
                norm_eps=self.norm_eps, dtype=self.dtype, name=f"block{i}")(x, train)
    return x


class Stem(nn.Module):
  """7x7/2 conv + norm + ReLU + 3x3/2 max-pool (padding 1, as PyTorch)."""
  width: int = 64
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[B, H, W, 3] -> [B, H / 4, W / 4, width]."""
    x = ConvNorm(self.width, 7, 2, self.norm, self.norm_eps, self.dtype, name="conv1")(x, train)
    x = nn.relu(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """ResNet-50/101 backbone returning the four stage outputs.

  Attributes:
    stage_blocks: bottleneck blocks per stage, (3, 4, 6, 3) for ResNet-50.
    stem_width: channels of the stem.
    base_width: bottleneck width of res2; doubles each stage; stage i outputs
      4 * base_width * 2**i channels.
    norm: 'frozen_bn' or 'sync_bn'.
    norm_eps: BatchNorm epsilon.
    dtype: compute dtype; parameters and statistics stay float32.
    remat: rematerialise the stem and each bottleneck (jax.checkpoint): the backward pass
      recomputes their activations from their inputs. Same parameters, same numbers.
  """
  stage_blocks: Sequence[int]
  stem_width: int = 64
  base_width: int = 64
  norm: str = "frozen_bn"
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Normalised images [B, H, W, 3] -> {'res2': [B, H/4, W/4, 4*base_width], ...,
    'res5': [B, H/32, W/32, 32*base_width]} in `dtype`."""
    if self.norm not in NORMS:
      raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.norm!r}")
    if len(self.stage_blocks) != 4 or min(self.stage_blocks) < 1:
      raise ValueError(f"ResNet stage_blocks must be 4 positive counts, got {tuple(self.stage_blocks)}")
    stem = nn.remat(Stem, static_argnums=(2,)) if self.remat else Stem
    x = stem(self.stem_width, self.norm, self.norm_eps, self.dtype, name="stem")(x, train)
    features = {}
    for i, num_blocks in enumerate(self.stage_blocks):
      x = ResStage(num_blocks, self.base_width * 2**i, stride=1 if i == 0 else 2, norm=self.norm,
                   norm_eps=self.norm_eps, dtype=self.dtype, remat=self.remat,
                   name=f"res{i + 2}")(x, train)
      features[f"res{i + 2}"] = x
    return features
