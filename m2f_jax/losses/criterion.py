"""The Mask2Former training loss: matching, then class, point-sampled BCE and dice terms.

For each of the L predictions separately (vmapped over the layer axis): Hungarian matching on
uniform points, a class-weighted cross-entropy over all queries of the batch, and BCE + dice on
the matched pairs at uncertainty-sampled points, summed and divided by the number of real targets
of the (global) batch. Terms `loss_ce_{l}`, `loss_mask_{l}`, `loss_dice_{l}` (l = L - 1 is the
final prediction) come weighted; the total is their sum. Everything is float32.

Memory: the matching of all L x B images runs at once (small); the point candidates and the point
losses run for `loss.layers_per_pass` predictions at a time (0 = all L, one vmap), and the
backward pass recomputes the bilinear corners from the kept points instead of storing them.
"""
import functools
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from m2f_jax.losses import matcher
from m2f_jax.losses import point_sampling

# Injected sampling points (tests, reproductions): 'matcher' [L, B, P, 2] uniform points of the
# matching cost; 'oversampled' [L, B, M, P_over, 2] candidates and 'fresh' [L, B, M, P_fresh, 2]
# uniform points of each target slot's mask loss. Without them, points are drawn from `rng`.
Points = Mapping[str, jax.Array]


def draw_points(rng: jax.Array, batch_size: int, num_slots: int,
                loss_cfg: ml_collections.ConfigDict) -> Dict[str, jax.Array]:
  """Uniform points of one prediction: 'matcher' [B, P, 2], 'oversampled', 'fresh' [B, M, *, 2]."""
  num_oversampled, _, num_fresh = point_sampling.num_points_split(
      loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
  key_match, key_over, key_fresh = jax.random.split(rng, 3)
  return {
      "matcher": jax.random.uniform(key_match, (batch_size, loss_cfg.num_points, 2)),
      "oversampled": jax.random.uniform(key_over, (batch_size, num_slots, num_oversampled, 2)),
      "fresh": jax.random.uniform(key_fresh, (batch_size, num_slots, num_fresh, 2)),
  }


def _class_loss(class_logits: jax.Array, labels: jax.Array, query_for_target: jax.Array,
                matched: jax.Array, no_object_weight: float) -> jax.Array:
  """Weighted-mean cross-entropy over all queries (F.cross_entropy with class weights).

  Args:
    class_logits: [B, Q, K+1].
    labels: int [B, M].
    query_for_target: int [B, M].
    matched: bool [B, M].
    no_object_weight: weight of the no-object class K.

  Returns:
    float32 [].
  """
  batch_size, num_queries, num_logits = class_logits.shape
  no_object = num_logits - 1
  # Unmatched slots scatter out of bounds and are dropped, so they never overwrite a match.
  query = jnp.where(matched, query_for_target, num_queries)
  batch_index = jnp.broadcast_to(jnp.arange(batch_size)[:, None], query.shape)
  target_class = jnp.full((batch_size, num_queries), no_object, jnp.int32)
  target_class = target_class.at[batch_index, query].set(labels.astype(jnp.int32), mode="drop")
  log_probs = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
  weight = jnp.where(target_class == no_object, no_object_weight, 1.0)
  return jnp.sum(weight * nll) / jnp.sum(weight)


def _select_pair_points(mask_logits: jax.Array, query_for_target: jax.Array, points: Points,
                        num_uncertain: int) -> jax.Array:
  """Each target slot's loss points: its most uncertain candidates plus fresh uniform points.

  Args:
    mask_logits: [B, Q, h, w] (no gradient flows).
    query_for_target: int [B, M].
    points: 'oversampled' [B, M, P_over, 2] and 'fresh' [B, M, P_fresh, 2].
    num_uncertain: most uncertain candidates kept per pair.

  Returns:
    float32 [B, M, P, 2].
  """
  select = functools.partial(point_sampling.importance_points, num_uncertain=num_uncertain)
  return jax.vmap(select)(jax.lax.stop_gradient(mask_logits), query_for_target,
                          points["oversampled"], points["fresh"])


def _mask_losses(mask_logits: jax.Array, segment_ids: jax.Array, query_for_target: jax.Array,
                 matched: jax.Array, pair_points: jax.Array,
                 num_masks: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """BCE and dice of the matched pairs at their points, each summed / num_masks.

  Args:
    mask_logits: [B, Q, h, w].
    segment_ids: int [B, S, H, W].
    query_for_target: int [B, M].
    matched: bool [B, M].
    pair_points: [B, M, P, 2].
    num_masks: float32 [] normaliser.

  Returns:
    (bce, dice) float32 [].
  """
  num_slots = query_for_target.shape[1]
  # Rematerialised: the backward pass keeps the points, not the [B, M, P, 4] corners.
  sample = jax.checkpoint(jax.vmap(point_sampling.point_sample_rows))
  logits = sample(mask_logits, query_for_target, pair_points)  # [B, M, P]
  target = jax.vmap(lambda segments, pts: point_sampling.sample_targets(
      segments, pts, num_slots))(segment_ids, pair_points)  # [B, M, P]
  bce = jnp.mean(jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))),
                 axis=-1)
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.sum(probs * target, axis=-1)
  denominator = jnp.sum(probs, axis=-1) + jnp.sum(target, axis=-1)
  dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  return (jnp.sum(jnp.where(matched, bce, 0.0)) / num_masks,
          jnp.sum(jnp.where(matched, dice, 0.0)) / num_masks)


def _match_batch(class_logits: jax.Array, mask_logits: jax.Array, labels: jax.Array,
                 segment_ids: jax.Array, points: jax.Array, loss_cfg: ml_collections.ConfigDict
                 ) -> Tuple[jax.Array, jax.Array]:
  """Matching of one prediction for every image: [B, Q, ...] inputs -> [B, M] int32 and bool."""
  def one_image(cls, masks, image_labels, segments, image_points):
    return matcher.match(cls, masks, image_labels, segments, image_points,
                         class_weight=loss_cfg.class_weight, mask_weight=loss_cfg.mask_weight,
                         dice_weight=loss_cfg.dice_weight, solver=loss_cfg.matcher)
  return jax.vmap(one_image)(class_logits, mask_logits, labels, segment_ids, points)


def match_predictions(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                      matcher_points: jax.Array, loss_cfg: ml_collections.ConfigDict
                      ) -> Tuple[jax.Array, jax.Array]:
  """The matching that `mask2former_loss` uses, for inspection.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w].
    batch: 'labels' int [B, M], 'segment_ids' int [B, S, H, W].
    matcher_points: [L, B, P, 2] uniform normalised (x, y) points.
    loss_cfg: cfg.loss.

  Returns:
    query_for_target int32 [L, B, M] and matched bool [L, B, M].
  """
  labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
  segment_ids = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
  return jax.vmap(lambda cls, masks, pts: _match_batch(cls, masks, labels, segment_ids, pts,
                                                       loss_cfg))(
      jnp.asarray(outputs["class_logits"]).astype(jnp.float32),
      jnp.asarray(outputs["mask_logits"]).astype(jnp.float32), matcher_points)


def _check_inputs(class_logits: jax.Array, mask_logits: jax.Array, labels: jax.Array,
                  segment_ids: jax.Array, loss_cfg: ml_collections.ConfigDict,
                  num_classes: int) -> None:
  """Raises ValueError on shapes or settings that cannot go together."""
  if class_logits.ndim != 4 or mask_logits.ndim != 5:
    raise ValueError("outputs must hold class_logits [L, B, Q, K+1] and mask_logits "
                     f"[L, B, Q, h, w], got {class_logits.shape} and {mask_logits.shape}")
  if class_logits.shape[-1] != num_classes + 1:
    raise ValueError(f"class_logits has {class_logits.shape[-1]} classes, expected num_classes + 1 "
                     f"= {num_classes + 1}")
  if class_logits.shape[:3] != mask_logits.shape[:3]:
    raise ValueError(f"class_logits {class_logits.shape} and mask_logits {mask_logits.shape} "
                     "disagree on [L, B, Q]")
  batch_size = class_logits.shape[1]
  if labels.ndim != 2 or labels.shape[0] != batch_size:
    raise ValueError(f"batch['labels'] must be [B={batch_size}, M], got {labels.shape}")
  if segment_ids.ndim != 4 or segment_ids.shape[0] != batch_size:
    raise ValueError(f"batch['segment_ids'] must be [B={batch_size}, S, H, W], got "
                     f"{segment_ids.shape}")
  if loss_cfg.matcher not in matcher.SOLVERS:
    raise ValueError(f"loss.matcher must be one of {matcher.SOLVERS}, got {loss_cfg.matcher!r}")


def mask2former_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                     rng: jax.Array, loss_cfg: ml_collections.ConfigDict, num_classes: int,
                     points: Optional[Points] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The authors' Mask2Former criterion over all L predictions.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w] (any float dtype).
    batch: 'labels' int [B, M] (-1 = padding), 'segment_ids' int [B, S, H, W]; other keys ignored.
    rng: key for the random points (unused when `points` is given).
    loss_cfg: cfg.loss (class/mask/dice/no_object weights, num_points, oversample_ratio,
      importance_sample_ratio, matcher).
    num_classes: K.
    points: optional injected points with a leading L axis (see `Points`).

  Returns:
    total float32 [] and {'loss_ce_{l}', 'loss_mask_{l}', 'loss_dice_{l}': float32 []} (weighted).
  """
  class_logits = jnp.asarray(outputs["class_logits"]).astype(jnp.float32)
  mask_logits = jnp.asarray(outputs["mask_logits"]).astype(jnp.float32)
  labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
  segment_ids = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
  _check_inputs(class_logits, mask_logits, labels, segment_ids, loss_cfg, num_classes)
  num_layers, batch_size = class_logits.shape[:2]
  num_slots = labels.shape[1]
  _, num_uncertain, _ = point_sampling.num_points_split(
      loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
  valid = labels >= 0
  # Under jit over global arrays this is the global count: per-device losses divided by it and
  # summed over devices equal the authors' all-reduced average of per-device losses.
  num_masks = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
  layers_per_pass = loss_cfg.get("layers_per_pass", 0)
  if not isinstance(layers_per_pass, int) or layers_per_pass < 0:
    raise ValueError(f"loss.layers_per_pass must be an int >= 0 (0 = all), got {layers_per_pass!r}")
  layer_keys = jax.random.split(rng, num_layers)
  if points is None:  # XLA drops the candidates drawn here; each prediction draws its own below
    matcher_points = jax.vmap(lambda key: draw_points(key, batch_size, num_slots, loss_cfg))(
        layer_keys)["matcher"]
    candidates = None
  else:
    matcher_points = points["matcher"]
    candidates = {"oversampled": points["oversampled"], "fresh": points["fresh"]}
  # The matching carries no gradient; all L x B problems are solved together.
  query_for_target, matched = jax.vmap(
      lambda cls, masks, pts: _match_batch(cls, masks, labels, segment_ids, pts, loss_cfg))(
          jax.lax.stop_gradient(class_logits), jax.lax.stop_gradient(mask_logits), matcher_points)

  def one_prediction(cls, masks, layer_query_for_target, layer_matched, layer_key,
                     layer_candidates):
    if layer_candidates is None:
      layer_candidates = draw_points(layer_key, batch_size, num_slots, loss_cfg)
    pair_points = _select_pair_points(masks, layer_query_for_target, layer_candidates,
                                      num_uncertain)
    loss_ce = _class_loss(cls, labels, layer_query_for_target, layer_matched,
                          loss_cfg.no_object_weight)
    loss_mask, loss_dice = _mask_losses(masks, segment_ids, layer_query_for_target, layer_matched,
                                        pair_points, num_masks)
    return (loss_cfg.class_weight * loss_ce, loss_cfg.mask_weight * loss_mask,
            loss_cfg.dice_weight * loss_dice)

  layer_args = (class_logits, mask_logits, query_for_target, matched, layer_keys, candidates)
  if layers_per_pass == 0 or layers_per_pass >= num_layers:
    loss_ce, loss_mask, loss_dice = jax.vmap(one_prediction)(*layer_args)
  else:  # fewer predictions at once: less memory for the point candidates, more sequential work
    loss_ce, loss_mask, loss_dice = jax.lax.map(lambda args: one_prediction(*args), layer_args,
                                                batch_size=layers_per_pass)
  terms = {}
  for layer in range(num_layers):
    terms[f"loss_ce_{layer}"] = loss_ce[layer]
    terms[f"loss_mask_{layer}"] = loss_mask[layer]
    terms[f"loss_dice_{layer}"] = loss_dice[layer]
  total = jnp.sum(loss_ce) + jnp.sum(loss_mask) + jnp.sum(loss_dice)
  return total, terms
