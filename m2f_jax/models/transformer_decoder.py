"""Mask2Former's masked-attention transformer decoder and its shared prediction head.

Queries attend to one pixel-decoder level per layer (1/32, 1/16, 1/8, round robin), restricted
to the foreground of the previous prediction; each layer runs masked cross-attention ->
self-attention -> FFN with post-norm. One head (LayerNorm -> class Linear, 3-layer MLP -> mask
embedding) predicts before the first layer and after every layer.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2f_jax.models.bilinear import resize_bilinear
from m2f_jax.models.lean_backward import LayerNorm, softmax
from m2f_jax.models.position import sine_position_embedding

NUM_LEVELS = 3
LAYER_NORM_EPS = 1e-5

# The authors' initialisation. Attention and FFN weights: xavier-uniform, where q, k and v count
# as one packed [3D, D] matrix; attention biases zero. Prediction heads: PyTorch's Linear default.
PACKED_QKV_INIT = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
XAVIER_INIT = nn.initializers.xavier_uniform()
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
INPUT_PROJ_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # c2_xavier_fill


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear bias: uniform in +-1/sqrt(fan_in)."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear(features: int, fan_in: int, dtype: Any, name: str,
                 kernel_init: nn.initializers.Initializer = TORCH_LINEAR_INIT) -> nn.Dense:
  """A Dense initialised like PyTorch's nn.Linear (kernel_init overridable, bias default)."""
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init,
                  bias_init=torch_linear_bias_init(fan_in), name=name)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections and float32 softmax statistics.

  Attributes:
    hidden_dim: model width D (also the projection width).
    num_heads: number of heads; D must be divisible by it.
    dtype: compute dtype.
  """
  hidden_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
               blocked: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Attends query [B, Q, D] to key/value [B, N, D]; blocked [B, Q, N] bool masks positions out.

    Returns [B, Q, D].
    """
    head_dim = self.hidden_dim // self.num_heads
    dense = lambda name, init: nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=init, name=name)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense("query", PACKED_QKV_INIT)(query)) * jnp.asarray(head_dim ** -0.5, self.dtype)
    k = split(dense("key", PACKED_QKV_INIT)(key))
    v = split(dense("value", PACKED_QKV_INIT)(value))
    logits = jnp.einsum("bqhd,bnhd->bhqn", q, k, preferred_element_type=jnp.float32)
    if blocked is not None:
      logits = jnp.where(blocked[:, None], -jnp.inf, logits)
    weights = softmax(logits, self.dtype)
    out = jnp.einsum("bhqn,bnhd->bqhd", weights, v)
    out = out.reshape(out.shape[:-2] + (self.hidden_dim,))
    return dense("out", XAVIER_INIT)(out)


class DecoderLayer(nn.Module):
  """Masked cross-attention -> self-attention -> FFN, each followed by residual + LayerNorm."""
  hidden_dim: int
  num_heads: int
  ffn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jnp.ndarray, query_pos: jnp.ndarray, memory: jnp.ndarray,
               memory_pos: jnp.ndarray, blocked: jnp.ndarray) -> jnp.ndarray:
    """queries, query_pos [B, Q, D]; memory, memory_pos [B, N, D]; blocked [B, Q, N] -> [B, Q, D]."""
    norm = lambda name: LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)
    attention = lambda name: MultiHeadAttention(self.hidden_dim, self.num_heads, self.dtype, name=name)

    x = queries
    attended = attention("cross_attn")(x + query_pos, memory + memory_pos, memory, blocked)
    x = norm("cross_attn_norm")(x + attended)

    with_pos = x + query_pos
    attended = attention("self_attn")(with_pos, with_pos, x)
    x = norm("self_attn_norm")(x + attended)

    ffn_in = torch_linear(self.ffn_dim, self.hidden_dim, self.dtype, "ffn_in", XAVIER_INIT)
    ffn_out = torch_linear(self.hidden_dim, self.ffn_dim, self.dtype, "ffn_out", XAVIER_INIT)
    x = norm("ffn_norm")(x + ffn_out(nn.relu(ffn_in(x))))
    return x


class PredictionHead(nn.Module):
  """Shared head: LayerNorm -> class logits [B, Q, K+1] and mask embedding [B, Q, mask_dim]
  (`masks_from_embeddings` turns embeddings into mask logits)."""
  num_classes: int
  hidden_dim: int
  mask_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """queries [B, Q, D] -> (class logits [B, Q, K+1], mask embedding [B, Q, mask_dim])."""
    x = LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="decoder_norm")(queries)
    class_logits = torch_linear(self.num_classes + 1, self.hidden_dim, self.dtype, "class_embed")(x)
    embedding = x
    for i, width in enumerate((self.hidden_dim, self.hidden_dim, self.mask_dim)):
      embedding = torch_linear(width, self.hidden_dim, self.dtype, f"mask_embed_{i}")(embedding)
      if i < 2:
        embedding = nn.relu(embedding)
    return class_logits, embedding


def masks_from_embeddings(embedding: jnp.ndarray, mask_features: jnp.ndarray) -> jnp.ndarray:
  """Mask embeddings [..., B, Q, C] against per-pixel features [B, h, w, C] -> [..., B, Q, h, w]."""
  return jnp.einsum("...bqc,bhwc->...bqhw", embedding, mask_features.astype(embedding.dtype))


@jax.custom_vjp
def _stacked_masks(embeddings: jnp.ndarray, mask_features: jnp.ndarray,
                   masks: jnp.ndarray) -> jnp.ndarray:
  """`masks` (= masks_from_embeddings(embeddings, mask_features), computed layer by layer without
  gradient), differentiable as that einsum: embeddings [L, B, Q, C], mask_features [B, h, w, C],
  masks [L, B, Q, h, w]. The backward is one matmul per input over all L layers, where the
  gradient of stacking L per-layer masks would first copy their cotangent out slice by slice.
  """
  del embeddings, mask_features
  return masks


def _stacked_masks_fwd(embeddings, mask_features, masks):
  return masks, (embeddings, mask_features)


def _stacked_masks_bwd(residuals, grad):
  embeddings, mask_features = residuals
  _, transpose = jax.vjp(masks_from_embeddings, embeddings, mask_features)
  return (*transpose(grad.astype(embeddings.dtype)), None)


_stacked_masks.defvjp(_stacked_masks_fwd, _stacked_masks_bwd)


class MaskedAttentionDecoder(nn.Module):
  """Mask2Former's transformer decoder (REFERENCE.md §1).

  Attributes:
    num_classes: K real classes (logits have K+1, the last is "no object").
    num_queries: Q.
    hidden_dim: D.
    num_heads: attention heads.
    ffn_dim: FFN width.
    num_layers: decoder layers; num_layers + 1 predictions.
    mask_dim: channels of mask_features.
    dtype: compute dtype.
    remat: rematerialise each layer (jax.checkpoint): the backward pass recomputes its
      activations (the attention weights among them) from its inputs. Same parameters and numbers.
  """
  num_classes: int
  num_queries: int
  hidden_dim: int
  num_heads: int
  ffn_dim: int
  num_layers: int
  mask_dim: int
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, multi_scale: Sequence[jnp.ndarray], mask_features: jnp.ndarray
               ) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Runs the decoder.

    Args:
      multi_scale: 3 maps [B, h_l, w_l, C] at 1/32, 1/16, 1/8.
      mask_features: [B, h4, w4, mask_dim] at 1/4.

    Returns:
      class_logits float32 [L, B, Q, K+1] and mask_logits [L, B, Q, h4, w4] in `dtype`,
      L = num_layers + 1.
    """
    if len(multi_scale) != NUM_LEVELS:
      raise ValueError(f"the decoder needs {NUM_LEVELS} feature maps, got {len(multi_scale)}")
    if self.hidden_dim % self.num_heads or self.hidden_dim % 2:
      raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by "
                       f"num_heads {self.num_heads}")
    batch = mask_features.shape[0]
    embed = lambda name, rows: self.param(name, nn.initializers.normal(1.0), (rows, self.hidden_dim))
    query_feat = embed("query_feat", self.num_queries)
    query_embed = embed("query_embed", self.num_queries)
    level_embed = embed("level_embed", NUM_LEVELS)

    memories, memory_pos, level_hw = [], [], []
    for level, features in enumerate(multi_scale):
      _, h, w, channels = features.shape
      features = features.astype(self.dtype)
      if channels != self.hidden_dim:
        features = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=INPUT_PROJ_INIT,
                            name=f"input_proj_{level}")(features)
      memory = features.reshape(batch, h * w, self.hidden_dim) + level_embed[level].astype(self.dtype)
      pos = sine_position_embedding(h, w, self.hidden_dim // 2).reshape(1, h * w, self.hidden_dim)
      memories.append(memory)
      memory_pos.append(pos.astype(self.dtype))
      level_hw.append((h, w))

    queries = jnp.broadcast_to(query_feat.astype(self.dtype), (batch,) + query_feat.shape)
    query_pos = jnp.broadcast_to(query_embed.astype(self.dtype), queries.shape)

    head = PredictionHead(self.num_classes, self.hidden_dim, self.mask_dim, self.dtype, name="head")
    features_no_grad = jax.lax.stop_gradient(mask_features)
    predict_masks = lambda e: masks_from_embeddings(jax.lax.stop_gradient(e), features_no_grad)
    class_logits, embedding = head(queries)
    all_classes, all_embeddings, all_masks = [class_logits], [embedding], [predict_masks(embedding)]
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    for i in range(self.num_layers):
      level = i % NUM_LEVELS
      blocked = self.attention_blocked(all_masks[-1], level_hw[level])
      queries = layer(self.hidden_dim, self.num_heads, self.ffn_dim, self.dtype,
                      name=f"layers_{i}")(queries, query_pos, memories[level], memory_pos[level],
                                          blocked)
      class_logits, embedding = head(queries)
      all_classes.append(class_logits)
      all_embeddings.append(embedding)
      all_masks.append(predict_masks(embedding))
    masks = _stacked_masks(jnp.stack(all_embeddings), mask_features, jnp.stack(all_masks))
    return jnp.stack(all_classes).astype(jnp.float32), masks

  @staticmethod
  def attention_blocked(mask_logits: jnp.ndarray, level_hw: Tuple[int, int]) -> jnp.ndarray:
    """Masked-attention mask [B, Q, h*w] (True = blocked) from mask logits [B, Q, h4, w4].

    Logits resized bilinearly to the level, blocked where sigmoid < 0.5 (logit < 0); a query with
    every position blocked attends everywhere instead. Carries no gradient.
    """
    resized = resize_bilinear(jax.lax.stop_gradient(mask_logits), level_hw)
    blocked = (jax.nn.sigmoid(resized) < 0.5).reshape(resized.shape[:2] + (-1,))
    return blocked & ~jnp.all(blocked, axis=-1, keepdims=True)
