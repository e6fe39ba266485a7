"""The Mask2Former training loss: matching, then class, point-sampled BCE and dice terms.

For each of the L predictions: Hungarian matching on uniform points, a class-weighted
cross-entropy over all queries of the batch, and BCE + dice on the matched pairs at
uncertainty-sampled points, summed and divided by the number of real targets of the (global)
batch. Terms `loss_ce_{l}`, `loss_mask_{l}`, `loss_dice_{l}` (l = L - 1 is the final prediction)
come weighted; the total is their sum. Everything is float32.

Cost: the matching of all L x B images runs at once (small). The mask losses run over the target
slots `loss.slots_per_pass` at a time, for all predictions and images together; a pass whose
slots hold no matched target is skipped at run time, so their cost follows the real targets of
the batch rather than `data.max_targets`. The backward pass keeps each pass's maps and points
and recomputes the rest, so no other per-point array outlives its pass.
"""
import functools
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from m2f_jax.losses import matcher
from m2f_jax.losses import point_sampling
from m2f_jax.losses import slot_passes

# Injected sampling points (tests, reproductions): 'matcher' [L, B, P, 2] uniform points of the
# matching cost; 'oversampled' [L, B, M, P_over, 2] candidates and 'fresh' [L, B, M, P_fresh, 2]
# uniform points of each target slot's mask loss. Without them, points are drawn from `rng`.
Points = Mapping[str, jax.Array]


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


def _pair_losses(maps: jax.Array, segment_ids: jax.Array, slots: jax.Array,
                 points: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """BCE and dice of (query, target slot) pairs of one image at their points.

  Args:
    maps: [N, h, w] mask logits of each pair's query.
    segment_ids: int [S, H, W].
    slots: int [N] target slot of each pair.
    points: [N, P, 2] normalised (x, y).

  Returns:
    (bce, dice) float32 [N].
  """
  logits = point_sampling.point_sample_each(maps, points)  # [N, P]
  target = point_sampling.sample_targets(segment_ids, points, slots)  # [N, P]
  bce = jnp.mean(matcher.softplus(logits) - logits * target, axis=-1)
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.sum(probs * target, axis=-1)
  denominator = jnp.sum(probs, axis=-1) + jnp.sum(target, axis=-1)
  return bce, 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _maps_by_pass(mask_logits: jax.Array, query_for_target: jax.Array, per_pass: int) -> jax.Array:
  """The matched query's mask logits of every slot, pass-major.

  Each pass then differentiates its own slice, and the gradient reaches `mask_logits` in one
  scatter-add instead of one dense [L, B, Q, h, w] accumulation per pass.

  Args:
    mask_logits: [L, B, Q, h, w].
    query_for_target: int [L, B, M].
    per_pass: slots per pass.

  Returns:
    [passes, L, B, per_pass, h, w]; pass p holds slots `slot_passes.pass_slots(p, ...)`.
  """
  num_layers, batch_size, num_slots = query_for_target.shape
  passes = jnp.arange(slot_passes.num_passes(num_slots, per_pass))[:, None]
  slots, _ = slot_passes.pass_slots(passes, per_pass, num_slots)  # [passes, per_pass]
  queries = jnp.moveaxis(query_for_target[:, :, slots], 2, 0)  # [passes, L, B, per_pass]
  layer = jnp.arange(num_layers)[None, :, None, None]
  image = jnp.arange(batch_size)[None, None, :, None]
  return mask_logits[layer, image, queries]


def _mask_losses(mask_logits: jax.Array, segment_ids: jax.Array, query_for_target: jax.Array,
                 matched: jax.Array, rng: jax.Array, candidates: Optional[Points],
                 loss_cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, jax.Array]:
  """Sums of BCE and dice over the matched pairs of every prediction, slot pass by slot pass.

  Args:
    mask_logits: [L, B, Q, h, w].
    segment_ids: int [B, S, H, W].
    query_for_target: int [L, B, M].
    matched: bool [L, B, M].
    rng: key of the drawn points (unused when `candidates` is given).
    candidates: None, or injected 'oversampled' [L, B, M, P_over, 2], 'fresh' [L, B, M, *, 2].
    loss_cfg: cfg.loss.

  Returns:
    (bce, dice) float32 [L], summed over the matched pairs of each prediction.
  """
  num_layers, batch_size, num_slots = matched.shape
  per_pass = loss_cfg.slots_per_pass
  num_over, num_uncertain, num_fresh = point_sampling.num_points_split(
      loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
  select = functools.partial(point_sampling.importance_points, num_uncertain=num_uncertain)
  select = jax.vmap(jax.vmap(select))  # over L, then B
  pair_losses = jax.vmap(jax.vmap(_pair_losses, in_axes=(0, 0, None, 0)),
                         in_axes=(0, None, None, 0))
  maps = _maps_by_pass(mask_logits, query_for_target, per_pass)

  def pass_points(index: jax.Array, pass_maps: jax.Array) -> jax.Array:
    """Importance-sampled points of the pass's pairs: [L, B, per_pass, P, 2]."""
    slots, _ = slot_passes.pass_slots(index, per_pass, num_slots)
    if candidates is None:
      key_over, key_fresh = jax.random.split(jax.random.fold_in(rng, index))
      shape = (num_layers, batch_size, per_pass)
      oversampled = jax.random.uniform(key_over, shape + (num_over, 2))
      fresh = jax.random.uniform(key_fresh, shape + (num_fresh, 2))
    else:
      oversampled = jnp.take(candidates["oversampled"], slots, axis=2)
      fresh = jnp.take(candidates["fresh"], slots, axis=2)
    return select(pass_maps, oversampled, fresh)

  def pass_sums(index: jax.Array, inputs: Tuple[jax.Array, jax.Array]
                ) -> Tuple[jax.Array, jax.Array]:
    """BCE and dice summed over the pass's matched pairs: float32 [L] each."""
    pass_maps, points = inputs
    slots, real = slot_passes.pass_slots(index, per_pass, num_slots)
    bce, dice = pair_losses(pass_maps, segment_ids, slots, points)  # [L, B, per_pass]
    keep = matched[:, :, slots] & real  # a repeated slot M - 1 counts once
    return (jnp.sum(jnp.where(keep, bce, 0.0), axis=(1, 2)),
            jnp.sum(jnp.where(keep, dice, 0.0), axis=(1, 2)))

  no_points = jnp.zeros((num_layers, batch_size, per_pass, loss_cfg.num_points, 2))
  points = slot_passes.map_passes(pass_points, matched, per_pass, no_points,
                                  xs=jax.lax.stop_gradient(maps))
  no_sums = (jnp.zeros(num_layers), jnp.zeros(num_layers))
  # Rematerialised: the backward pass keeps each pass's maps and points, not its
  # [L, B, per_pass, P] arrays.
  sums = slot_passes.map_passes(pass_sums, matched, per_pass, no_sums,
                                xs=(maps, jax.lax.stop_gradient(points)), remat=True)
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)


def match_predictions(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                      matcher_points: jax.Array, loss_cfg: ml_collections.ConfigDict
                      ) -> Tuple[jax.Array, jax.Array]:
  """The matching of every prediction and image (no gradient).

  The costs come one prediction at a time (its [B, P, Q] point samples are the largest arrays of
  the matching); within it, the cost columns come `loss.slots_per_pass` slots at a time, skipping
  passes of padding slots. The L x B assignments then run as one batch: the solver's loop runs
  once for all of them instead of once per prediction.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w].
    batch: 'labels' int [B, M], 'segment_ids' int [B, S, H, W].
    matcher_points: [L, B, P, 2] uniform normalised (x, y) points.
    loss_cfg: cfg.loss.

  Returns:
    query_for_target int32 [L, B, M] and matched bool [L, B, M].
  """
  class_logits = jax.lax.stop_gradient(jnp.asarray(outputs["class_logits"]).astype(jnp.float32))
  mask_logits = jax.lax.stop_gradient(jnp.asarray(outputs["mask_logits"]).astype(jnp.float32))
  labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
  segment_ids = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
  batch_size, num_queries = class_logits.shape[1:3]
  num_slots, per_pass = labels.shape[1], loss_cfg.slots_per_pass
  costs = functools.partial(matcher.slot_costs, class_weight=loss_cfg.class_weight,
                            mask_weight=loss_cfg.mask_weight, dice_weight=loss_cfg.dice_weight)
  costs = jax.vmap(costs, in_axes=(0, 0, 0, 0, None))  # over B
  assign = jax.vmap(jax.vmap(functools.partial(matcher.assign, solver=loss_cfg.matcher)))

  def prediction_cost(inputs) -> jax.Array:
    terms = jax.vmap(matcher.query_terms)(*inputs)
    points = inputs[2]

    def pass_cost(index: jax.Array, _) -> jax.Array:
      slots, _ = slot_passes.pass_slots(index, per_pass, num_slots)
      return costs(terms, labels[:, slots], segment_ids, points, slots)  # [B, Q, per_pass]

    no_cost = jnp.zeros((batch_size, num_queries, per_pass))
    cost = slot_passes.map_passes(pass_cost, labels >= 0, per_pass, no_cost)  # [passes, B, Q, N]
    return jnp.moveaxis(cost, 0, -2).reshape(batch_size, num_queries, -1)[..., :num_slots]

  cost = jax.lax.map(prediction_cost, (class_logits, mask_logits, matcher_points))  # [L, B, Q, M]
  return assign(cost, jnp.broadcast_to(labels >= 0, cost.shape[:2] + labels.shape[1:]))


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
  per_pass = loss_cfg.get("slots_per_pass")
  if not isinstance(per_pass, int) or isinstance(per_pass, bool) or per_pass < 1:
    raise ValueError(f"loss.slots_per_pass must be an int >= 1, got {per_pass!r}")


def mask2former_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                     rng: jax.Array, loss_cfg: ml_collections.ConfigDict, num_classes: int,
                     points: Optional[Points] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The authors' Mask2Former criterion over all L predictions.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w] (any float dtype).
    batch: 'labels' int [B, M] (-1 = padding), 'segment_ids' int [B, S, H, W]; other keys ignored.
    rng: key for the random points (unused when `points` is given).
    loss_cfg: cfg.loss (class/mask/dice/no_object weights, num_points, oversample_ratio,
      importance_sample_ratio, matcher, slots_per_pass).
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
  # Under jit over global arrays this is the global count: per-device losses divided by it and
  # summed over devices equal the authors' all-reduced average of per-device losses.
  num_masks = jnp.maximum(jnp.sum(labels >= 0).astype(jnp.float32), 1.0)
  match_key, pair_key = jax.random.split(rng)
  if points is None:
    matcher_points = jax.random.uniform(match_key, (num_layers, batch_size, loss_cfg.num_points, 2))
    candidates = None
  else:
    matcher_points = points["matcher"]
    candidates = {"oversampled": points["oversampled"], "fresh": points["fresh"]}
  query_for_target, matched = match_predictions(outputs, batch, matcher_points, loss_cfg)
  loss_ce = jax.vmap(lambda cls, rows, ok: _class_loss(cls, labels, rows, ok,
                                                       loss_cfg.no_object_weight))(
      class_logits, query_for_target, matched)
  bce, dice = _mask_losses(mask_logits, segment_ids, query_for_target, matched, pair_key,
                           candidates, loss_cfg)
  loss_ce = loss_cfg.class_weight * loss_ce
  loss_mask = loss_cfg.mask_weight * bce / num_masks
  loss_dice = loss_cfg.dice_weight * dice / num_masks
  terms = {}
  for layer in range(num_layers):
    terms[f"loss_ce_{layer}"] = loss_ce[layer]
    terms[f"loss_mask_{layer}"] = loss_mask[layer]
    terms[f"loss_dice_{layer}"] = loss_dice[layer]
  total = jnp.sum(loss_ce) + jnp.sum(loss_mask) + jnp.sum(loss_dice)
  return total, terms
