"""Swin Transformer backbone as the authors' detectron2 version (D2SwinTransformer).

Differences from the classification Swin that the authors made and that we keep: every stage
pads its map to a multiple of the window and keeps the shifted windows whatever its size (no
shrinking of the window), and each stage output gets its own LayerNorm (norm0..norm3).

Parameter tree (mirrors the authors' names, see `m2f_jax/convert`):
  patch_embed/{proj/{kernel, bias}, norm/{scale, bias}}
  layer{i}/block{j}/{norm1, attn/{qkv, proj, relative_position_bias_table}, norm2, mlp/{fc1, fc2}}
  layer{i}/downsample/{norm, reduction}   (i < 3)
  norm{i}
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.models.lean_backward import LayerNorm, softmax

LAYER_NORM_EPS = 1e-5
MASKED_LOGIT = -100.0  # the authors' value for attention across shifted-window regions


def _layer_norm(dtype, name: str) -> LayerNorm:
  return LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.truncated_normal(0.02), name=name)


def relative_position_index(window_size: int) -> np.ndarray:
  """int32 [w*w, w*w]: row of the bias table for each (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
  coords = coords.reshape(2, -1)  # [2, N]
  delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, N, N], >= 0
  return (delta[0] * (2 * window_size - 1) + delta[1]).astype(np.int32)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> jnp.ndarray:
  """float32 [nW, w*w, w*w]: 0 within a region, -100 across the regions a cyclic shift joins.

  `height` and `width` are the padded sizes (multiples of the window), as the authors use.
  Built with jnp from iotas so that large maps do not become constants of the program.
  """
  def regions(size):  # [size]: 0 | 1 | 2 for [0, size-w), [size-w, size-shift), [size-shift, size)
    idx = jnp.arange(size)
    return (idx >= size - window_size).astype(jnp.int32) + (idx >= size - shift).astype(jnp.int32)

  region = regions(height)[:, None] * 3 + regions(width)[None, :]  # [Hp, Wp]
  windows = window_partition(region[None, :, :, None], window_size)[0, :, :, 0]  # [nW, N]
  differs = windows[:, :, None] != windows[:, None, :]
  return jnp.where(differs, MASKED_LOGIT, 0.0).astype(jnp.float32)


def window_partition(x: jnp.ndarray, window_size: int) -> jnp.ndarray:
  """[B, H, W, C] (H, W multiples of the window) -> [B, nW, w*w, C], windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window_size * window_size, c)


def window_merge(windows: jnp.ndarray, window_size: int, height: int, width: int) -> jnp.ndarray:
  """Inverse of window_partition: [B, nW, w*w, C] -> [B, H, W, C]."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, height // window_size, width // window_size, window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


@jax.custom_vjp
def exact_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """x * Phi(x), Phi the standard normal CDF (torch's default GELU), any shape.

  Written with erf, and with a backward that recomputes Phi and its density from x: the
  autodiff of the erfc form keeps two more activation-sized residuals and evaluates erfc,
  several times slower than erf on CPU.
  """
  return x * _normal_cdf(x)


def _normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
  return 0.5 + 0.5 * jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype))


def _exact_gelu_forward(x):
  return exact_gelu(x), x


def _exact_gelu_backward(x, grad):
  density = jnp.exp(-0.5 * x * x) * np.asarray((2 * np.pi) ** -0.5, x.dtype)
  return (grad * (_normal_cdf(x) + x * density),)


exact_gelu.defvjp(_exact_gelu_forward, _exact_gelu_backward)


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float, train: bool) -> jnp.ndarray:
  """Stochastic depth: zeroes whole samples of a residual branch with probability `rate`
  and rescales the others by 1 / (1 - rate); the identity unless training. x: [B, ...]."""
  if not train or rate <= 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(module.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a learned relative position bias.

  Attributes:
    num_heads: attention heads.
    window_size: side w of the square window.
    dtype: compute dtype (softmax in float32).
  """
  num_heads: int
  window_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, windows: jnp.ndarray, mask: Optional[jnp.ndarray]) -> jnp.ndarray:
    """windows [B, nW, N, C] (N = w*w), mask None or [nW, N, N] -> [B, nW, N, C]."""
    b, nw, n, c = windows.shape
    head_dim = c // self.num_heads
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1) ** 2, self.num_heads), jnp.float32)
    bias = table[relative_position_index(self.window_size)]  # [N, N, heads]
    bias = jnp.transpose(bias, (2, 0, 1))  # [heads, N, N]
    if mask is not None:
      bias = bias[None] + mask[:, None]  # [nW, heads, N, N]

    qkv = _dense(3 * c, self.dtype, "qkv")(windows)  # [B, nW, N, 3C]
    # split (not indexing): its gradient is one concatenation instead of three padded copies
    q, k, v = (x.reshape(b, nw, n, self.num_heads, head_dim) for x in jnp.split(qkv, 3, axis=-1))
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32) + bias
    weights = softmax(logits, self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(b, nw, n, c)
    return _dense(c, self.dtype, "proj")(out)


class SwinBlock(nn.Module):
  """Pre-norm (shifted-)window attention block and MLP, both with stochastic depth.

  Attributes:
    num_heads: attention heads.
    window_size: window side w.
    shift: cyclic shift (0 or w // 2).
    mlp_ratio: hidden width of the MLP over the channels.
    drop_path_rate: stochastic-depth rate of this block.
    dtype: compute dtype.
  """
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    ws = self.window_size
    y = _layer_norm(self.dtype, "norm1")(x)
    pad_h, pad_w = (-h) % ws, (-w) % ws
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = None
    if self.shift > 0:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shifted_window_mask(hp, wp, ws, self.shift)
    y = WindowAttention(self.num_heads, ws, self.dtype, name="attn")(window_partition(y, ws), mask)
    y = window_merge(y, ws, hp, wp)
    if self.shift > 0:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    y = y[:, :h, :w]
    x = x + drop_path(self, y, self.drop_path_rate, train)

    y = _layer_norm(self.dtype, "norm2")(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + drop_path(self, y, self.drop_path_rate, train)


class Mlp(nn.Module):
  """Linear -> exact GELU -> Linear back to the input width."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[..., C] -> [..., C]."""
    y = _dense(self.hidden, self.dtype, "fc1")(x)
    y = exact_gelu(y)
    return _dense(x.shape[-1], self.dtype, "fc2")(y)


class PatchMerging(nn.Module):
  """2x2 neighbourhood concatenation (x0=[0::2,0::2], x1=[1::2,0::2], x2=[0::2,1::2],
  x3=[1::2,1::2]) -> LayerNorm(4C) -> Linear(4C -> 2C, no bias); odd sizes padded first."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""
    c = x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = _layer_norm(self.dtype, "norm")(x)
    return _dense(2 * c, self.dtype, "reduction", use_bias=False)(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patch_size x patch_size conv (input padded bottom/right) + LayerNorm."""
  embed_dim: int
  patch_size: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, 3] -> [B, ceil(H/p), ceil(W/p), embed_dim]."""
    p = self.patch_size
    x = jnp.pad(x, ((0, 0), (0, (-x.shape[1]) % p), (0, (-x.shape[2]) % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="proj")(x)
    return _layer_norm(self.dtype, "norm")(x)


class SwinStage(nn.Module):
  """`depth` blocks alternating plain and shifted windows, then an optional PatchMerging.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads.
    window_size: window side w; odd blocks shift by w // 2.
    mlp_ratio: MLP hidden width over the channels.
    drop_path_rates: one stochastic-depth rate per block.
    downsample: whether a PatchMerging follows.
    dtype: compute dtype.
    remat: rematerialise each block (jax.checkpoint; its drop-path draws repeat exactly).
  """
  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float
  drop_path_rates: Sequence[float]
  downsample: bool
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool):
    """[B, H, W, C] -> (stage output [B, H, W, C], next stage input [B, H/2, W/2, 2C] or the same)."""
    block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    for j in range(self.depth):
      x = block(self.num_heads, self.window_size, shift=0 if j % 2 == 0 else self.window_size // 2,
                mlp_ratio=self.mlp_ratio, drop_path_rate=self.drop_path_rates[j],
                dtype=self.dtype, name=f"block{j}")(x, train)
    if not self.downsample:
      return x, x
    return x, PatchMerging(self.dtype, name="downsample")(x)


class Swin(nn.Module):
  """Swin Transformer backbone returning the four normalised stage outputs.

  Attributes:
    embed_dim: channels C of stage 1; stage i has C * 2**i.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: window side.
    patch_size: side of the patch embedding.
    mlp_ratio: MLP hidden width over the channels.
    drop_path_rate: stochastic depth of the last block; rises linearly from 0 over all blocks.
    dtype: compute dtype; parameters stay float32.
    remat: rematerialise each block (jax.checkpoint): the backward pass recomputes its
      activations from its input. Same parameters, same numbers.
  """
  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.3
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """Normalised images [B, H, W, 3] -> {'res2': [B, H/4, W/4, C], 'res3': [B, H/8, W/8, 2C],
    'res4': [B, H/16, W/16, 4C], 'res5': [B, H/32, W/32, 8C]} in `dtype`."""
    if len(self.depths) != 4 or len(self.num_heads) != 4:
      raise ValueError(f"Swin needs 4 stages, got depths={tuple(self.depths)}, "
                       f"num_heads={tuple(self.num_heads)}")
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2**i) % heads:
        raise ValueError(f"Swin stage {i} width {self.embed_dim * 2**i} is not divisible by "
                         f"its {heads} heads")
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name="patch_embed")(x)
    features = {}
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      first = sum(self.depths[:i])
      stage = SwinStage(depth, heads, self.window_size, self.mlp_ratio,
                        tuple(float(r) for r in rates[first:first + depth]),
                        downsample=i < 3, dtype=self.dtype, remat=self.remat, name=f"layer{i}")
      out, x = stage(x, train)
      features[f"res{i + 2}"] = _layer_norm(self.dtype, f"norm{i}")(out)
    return features
