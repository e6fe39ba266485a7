"""Instance inference: top-k (query, class) pairs with mask-quality scores (REFERENCE.md §3)."""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def instance_core(class_logits: jax.Array, mask_logits: jax.Array, top_k: int = 100,
                  valid_hw: Optional[jax.Array] = None) -> dict:
  """Class logits [Q, K+1], mask logits [Q, H, W] -> the top-k of the Q*K class scores.

  Returns scores float32 [N], labels int32 [N], masks bool [N, H, W] (logit > 0, inside `valid_hw`),
  N = min(top_k, Q*K), sorted by class probability (descending). score = class probability * mean
  sigmoid inside the binary mask.
  """
  num_queries, height, width = mask_logits.shape
  num_classes = class_logits.shape[-1] - 1
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :-1]
  top_probs, flat_index = jax.lax.top_k(class_probs.reshape(-1), min(top_k, num_queries * num_classes))
  labels = (flat_index % num_classes).astype(jnp.int32)
  query = flat_index // num_classes
  logits = mask_logits.astype(jnp.float32)[query]
  masks = logits > 0
  if valid_hw is not None:
    valid = ((jnp.arange(height)[:, None] < valid_hw[0]) & (jnp.arange(width)[None, :] < valid_hw[1]))
    masks = masks & valid[None]
  binary = masks.astype(jnp.float32)
  mask_scores = (jnp.sum(jax.nn.sigmoid(logits) * binary, axis=(1, 2))
                 / (jnp.sum(binary, axis=(1, 2)) + 1e-6))
  return dict(scores=top_probs * mask_scores, labels=labels, masks=masks)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _instance_core_jit(class_logits, mask_logits, valid_hw, top_k):
  return instance_core(class_logits, mask_logits, top_k, valid_hw)


def filter_instances(result: dict, thing_only_mask: Optional[Sequence[bool]]) -> dict:
  """Keeps the entries whose label is a thing class (host side; no-op when the mask is None)."""
  result = {k: np.asarray(v) for k, v in result.items()}
  if thing_only_mask is None:
    return result
  keep = np.asarray(thing_only_mask, bool)[result["labels"]]
  return {k: v[keep] for k, v in result.items()}


def instance_inference(class_logits, mask_logits, top_k: int = 100,
                       thing_only_mask: Optional[Sequence[bool]] = None,
                       valid_hw: Optional[Sequence[int]] = None) -> dict:
  """Class logits [Q, K+1], mask logits [Q, H, W] -> {scores [N], labels [N], masks bool [N, H, W]}.

  With `thing_only_mask` (bool [K], e.g. is_thing when panoptic output is also produced) the
  top-k entries of stuff classes are removed afterwards, as the authors do.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be positive, got {top_k}")
  if valid_hw is None:
    valid_hw = mask_logits.shape[-2:]
  result = _instance_core_jit(jnp.asarray(class_logits), jnp.asarray(mask_logits),
                              jnp.asarray(valid_hw, jnp.int32), int(top_k))
  return filter_instances(jax.device_get(result), thing_only_mask)
