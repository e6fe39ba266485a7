"""Semantic inference: per-class score maps from mask classification (REFERENCE.md §3)."""
import jax
import jax.numpy as jnp


def semantic_inference(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
  """Class logits [Q, K+1] and mask logits [Q, H, W] -> scores [K, H, W].

  score[k] = sum_q softmax(class_logits[q])[k] * sigmoid(mask_logits[q]); "no object" is dropped.
  """
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
  mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  return jnp.einsum("qk,qhw->khw", class_probs, mask_probs, precision=jax.lax.Precision.HIGHEST)
