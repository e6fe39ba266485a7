"""LayerNorm, GroupNorm and softmax with hand-written gradients that keep less for the backward
pass, and `gradients_together`, which keeps XLA from putting off a layer's weight gradients.

Autodiff through flax's `nn.LayerNorm` keeps 3-4 float32 intermediates of the input's size per
norm (the centred input, its square, the normalised input, the scaled one), and autodiff through
`jax.nn.softmax` keeps its exponentials besides its output; XLA keeps most of them alive until the
backward pass. The norms here keep only the standardised input and 1/sigma (GroupNorm: in the
input's dtype), the softmax only its output. In the Swin-T train step (benchmarks/train_step.py)
the LayerNorm and softmax take 0.35 GB off the compiled temp memory. The norms' numbers are
PyTorch's: two-pass biased variance, epsilon inside the square root, statistics in float32.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def _standardize(x: jax.Array, epsilon: float):
  """(x - mean) / sqrt(var + epsilon) [..., C] and 1 / sqrt(var + epsilon) [..., 1]."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
  return centred * inv_std, inv_std


def _sum_leading(x: jax.Array) -> jax.Array:
  """[..., C] -> [C]."""
  return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """x [..., C], scale and bias [C], all float32 -> x standardised over C * scale + bias."""
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  standardized, inv_std = _standardize(x, epsilon)
  return standardized * scale + bias, (standardized, inv_std, scale)


def _layer_norm_bwd(epsilon, residuals, grad):
  """d x = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma with g = grad * scale."""
  del epsilon  # inside inv_std
  standardized, inv_std, scale = residuals
  g = grad * scale
  grad_x = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True) - standardized *
                      jnp.mean(g * standardized, axis=-1, keepdims=True))
  return grad_x, _sum_leading(grad * standardized), _sum_leading(grad)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _group_mean(x: jax.Array, num_groups: int) -> jax.Array:
  """[B, N, C] -> [B, 1, C]: the mean over each image's positions and its channel's group.

  Sums over the positions first, then over the groups of the [B, C] sums, so no [B, N, C] array
  is laid out again by groups (a copy of every activation on TPU)."""
  b, n, c = x.shape
  sums = jnp.sum(x, axis=1).reshape(b, num_groups, c // num_groups)
  means = jnp.sum(sums, axis=2, keepdims=True) / (n * (c // num_groups))
  return jnp.broadcast_to(means, sums.shape).reshape(b, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """x [B, N, C] (any float dtype), scale and bias [C] float32 -> float32 x standardised over
  each image's positions and the C / G channels of each of G groups, * scale + bias."""
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  centred = x.astype(jnp.float32) - _group_mean(x.astype(jnp.float32), num_groups)
  inv_std = jax.lax.rsqrt(_group_mean(jnp.square(centred), num_groups) + epsilon)  # [B, 1, C]
  standardized = centred * inv_std
  return standardized * scale + bias, (standardized.astype(x.dtype), inv_std, scale)


def _group_norm_bwd(num_groups, epsilon, residuals, grad):
  """As `_layer_norm_bwd`, with the means over each image's group."""
  del epsilon  # inside inv_std
  standardized, inv_std, scale = residuals
  x_hat = standardized.astype(jnp.float32)
  g = grad * scale
  grad_x = inv_std * (g - _group_mean(g, num_groups) -
                      x_hat * _group_mean(g * x_hat, num_groups))
  return grad_x.astype(standardized.dtype), _sum_leading(grad * x_hat), _sum_leading(grad)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(logits: jax.Array, dtype: Any = None) -> jax.Array:
  """Softmax over the last axis, [..., N] -> [..., N] in `dtype` (None: the logits'), as
  `jax.nn.softmax(logits, axis=-1).astype(dtype)` (-inf entries get weight 0). Computed in the
  logits' dtype; the backward pass keeps the weights in `dtype` (the copy the attention's value
  product keeps anyway) and works in float32."""
  exp = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return (exp / jnp.sum(exp, axis=-1, keepdims=True)).astype(dtype or logits.dtype)


def _softmax_fwd(logits, dtype):
  weights = softmax(logits, dtype)
  return weights, (weights, jnp.zeros((), logits.dtype))


def _softmax_bwd(dtype, residuals, grad):
  """d logits = weights * (grad - <grad, weights>)."""
  del dtype
  weights, like_logits = residuals
  weights = weights.astype(jnp.float32)
  grad = grad.astype(jnp.float32)
  grad_logits = weights * (grad - jnp.sum(grad * weights, axis=-1, keepdims=True))
  return (grad_logits.astype(like_logits.dtype),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def gradients_together(fn):
  """fn(module, *arrays) -> output, with a backward pass whose parameter and input gradients come
  out of one `optimization_barrier`.

  XLA's TPU scheduler puts the weight gradients of a layer's dense ops off to the end of the
  backward pass, keeping their inputs and output gradients alive until then (in the R50 pixel
  decoder's six encoder layers, the FFN's [B, S, 1024] activations and their gradients). The
  barrier makes the next layer's backward wait for this layer's weight gradients: the pixel
  decoder's gradient at 2 images of 1024x1024 in bfloat16 on a v5p needs 0.77 GiB less
  (benchmarks/pixel_decoder_memory.py).
  """
  def forward(module, *arrays):
    return nn.vjp(fn, module, *arrays)

  def backward(vjp_fn, grad):
    return jax.lax.optimization_barrier(vjp_fn(grad))

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, [..., C] -> [..., C], with flax's params 'scale' (ones) and
  'bias' (zeros), computed in float32.

  Attributes:
    epsilon: added to the variance.
    dtype: output dtype; None gives the promotion of the input's and the params' dtypes.
    param_dtype: dtype of scale and bias.
  """
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    y = layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                   self.epsilon)
    return y.astype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))


class GroupNorm(nn.Module):
  """GroupNorm over the last axis of [B, ..., C], with flax's params 'scale' (ones) and 'bias'
  (zeros), computed in float32 (two-pass variance, as PyTorch's); the backward pass keeps the
  standardised input in the input's dtype and 1/sigma.

  Attributes:
    num_groups: groups G (C divisible by G).
    epsilon: added to the variance.
    dtype: output dtype.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    if features % self.num_groups:
      raise ValueError(f"GroupNorm: {features} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    y = group_norm(x.reshape(x.shape[0], -1, features), scale, bias, self.num_groups, self.epsilon)
    return y.reshape(x.shape).astype(self.dtype)
