"""LayerNorm and softmax with hand-written gradients that keep less for the backward pass.

Autodiff through flax's `nn.LayerNorm` keeps 3-4 float32 intermediates of the input's size per
norm (the centred input, its square, the normalised input, the scaled one), and autodiff through
`jax.nn.softmax` keeps its exponentials besides its output; XLA keeps most of them alive until the
backward pass. The LayerNorm here keeps only the standardised input and 1/sigma, the softmax only
its output. In the Swin-T train step (benchmarks/train_step.py) that is 0.35 GB less compiled temp
memory. The LayerNorm's numbers are PyTorch's: two-pass biased variance, epsilon inside the
square root, statistics in float32.
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


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis, [..., N] -> [..., N], as `jax.nn.softmax(logits, axis=-1)`
  (-inf entries get weight 0)."""
  exp = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return exp / jnp.sum(exp, axis=-1, keepdims=True)


def _softmax_fwd(logits):
  weights = softmax(logits)
  return weights, weights


def _softmax_bwd(weights, grad):
  """d logits = weights * (grad - <grad, weights>)."""
  return (weights * (grad - jnp.sum(grad * weights, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


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
