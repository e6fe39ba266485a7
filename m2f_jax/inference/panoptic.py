"""Panoptic inference: the authors' query-to-segment merging (REFERENCE.md §3).

`panoptic_core` is a fixed-shape jnp function (jit/vmap friendly) returning arrays; `panoptic_inference`
is the thin host wrapper that builds the segment list.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def panoptic_core(class_logits: jax.Array, mask_logits: jax.Array, is_thing: jax.Array,
                  object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8,
                  valid_hw: Optional[jax.Array] = None) -> dict:
  """Class logits [Q, K+1], mask logits [Q, H, W], is_thing bool [K] -> arrays.

  Pixels outside the top-left `valid_hw` (int [2]; None = all) region belong to no segment and
  count in no area. Returns:
    segment_map int32 [H, W]: segment id per pixel, 0 = void.
    segment_id int32 [Q]: id written by query q (0 = query dropped).
    creates_segment bool [Q]: query q opened a new segment (the first query of each output segment).
    label int32 [Q], score float32 [Q]: the query's best class and its probability.
  """
  num_queries, height, width = mask_logits.shape
  num_classes = class_logits.shape[-1] - 1
  probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  score = probs.max(-1)
  label = probs.argmax(-1).astype(jnp.int32)
  keep = (label != num_classes) & (score > object_mask_threshold)
  mask_probs = jax.nn.sigmoid(mask_logits.astype(jnp.float32))

  if valid_hw is None:
    valid = jnp.ones((height, width), bool)
  else:
    valid = ((jnp.arange(height)[:, None] < valid_hw[0]) & (jnp.arange(width)[None, :] < valid_hw[1]))

  # Each pixel goes to the kept query maximising prob * sigmoid; dropped queries rank below all kept.
  ranked = jnp.where(keep[:, None, None], score[:, None, None] * mask_probs, -1.0)
  winner = ranked.argmax(0).astype(jnp.int32)                                    # [H, W]
  winner_prob = jnp.take_along_axis(mask_probs, winner[None], axis=0)[0]         # [H, W]
  in_segment = valid & (winner_prob >= 0.5)
  flat_winner = winner.reshape(-1)
  won_area = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.int32), flat_winner, num_queries)
  segment_area = jax.ops.segment_sum(in_segment.reshape(-1).astype(jnp.int32), flat_winner,
                                     num_queries)
  own_area = jnp.sum((mask_probs >= 0.5) & valid[None], axis=(1, 2), dtype=jnp.int32)

  won_share = won_area.astype(jnp.float32) / jnp.maximum(own_area, 1).astype(jnp.float32)
  passes = (keep & (won_area > 0) & (own_area > 0) & (segment_area > 0)
            & (won_share >= overlap_threshold))

  # Stuff queries of a class seen before (in query order) reuse that class's first segment id.
  query_index = jnp.arange(num_queries)
  is_stuff = ~jnp.asarray(is_thing, bool)[jnp.clip(label, 0, num_classes - 1)]
  stuff_passes = passes & is_stuff
  same_stuff_earlier = (stuff_passes[None, :] & stuff_passes[:, None]
                        & (label[None, :] == label[:, None])
                        & (query_index[None, :] < query_index[:, None]))        # [q, earlier q']
  has_earlier = same_stuff_earlier.any(1)
  creates_segment = passes & ~has_earlier
  new_ids = jnp.cumsum(creates_segment.astype(jnp.int32))
  first_of_class = same_stuff_earlier.argmax(1)
  segment_id = jnp.where(creates_segment, new_ids,
                         jnp.where(passes & has_earlier, new_ids[first_of_class], 0))
  segment_map = jnp.where(in_segment, segment_id[winner], 0).astype(jnp.int32)
  return dict(segment_map=segment_map, segment_id=segment_id.astype(jnp.int32),
              creates_segment=creates_segment, label=label, score=score)


@functools.partial(jax.jit, static_argnames=("object_mask_threshold", "overlap_threshold"))
def _panoptic_core_jit(class_logits, mask_logits, is_thing, valid_hw, object_mask_threshold,
                       overlap_threshold):
  return panoptic_core(class_logits, mask_logits, is_thing, object_mask_threshold,
                       overlap_threshold, valid_hw)


def segments_from_arrays(arrays: dict, is_thing: Sequence[bool]) -> List[dict]:
  """The segment list [{id, category_id, isthing, score}] from `panoptic_core`'s arrays (host side)."""
  creates = np.asarray(arrays["creates_segment"])
  ids, labels, scores = (np.asarray(arrays[k]) for k in ("segment_id", "label", "score"))
  return [dict(id=int(ids[q]), category_id=int(labels[q]), isthing=bool(is_thing[labels[q]]),
               score=float(scores[q]))
          for q in np.flatnonzero(creates)]


def panoptic_inference(class_logits, mask_logits, is_thing, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8,
                       valid_hw: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, List[dict]]:
  """Class logits [Q, K+1], mask logits [Q, H, W] -> (segment_map int32 [H, W], segments).

  segments: [{'id', 'category_id', 'isthing', 'score'}] in id order; `score` is the class
  probability of the query that opened the segment (the authors report no score).
  """
  is_thing = np.asarray(is_thing, bool)
  if is_thing.shape != (class_logits.shape[-1] - 1,):
    raise ValueError(f"is_thing has shape {is_thing.shape}, expected ({class_logits.shape[-1] - 1},) "
                     "= one flag per real class")
  if valid_hw is None:
    valid_hw = mask_logits.shape[-2:]
  arrays = _panoptic_core_jit(jnp.asarray(class_logits), jnp.asarray(mask_logits),
                              jnp.asarray(is_thing), jnp.asarray(valid_hw, jnp.int32),
                              float(object_mask_threshold), float(overlap_threshold))
  arrays = jax.device_get(arrays)
  return np.asarray(arrays["segment_map"]), segments_from_arrays(arrays, is_thing)
