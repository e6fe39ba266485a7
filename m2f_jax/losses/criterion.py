"""The Mask2Former training loss: matching, then class, point-sampled BCE and dice terms.

For each of the L predictions: Hungarian matching on uniform points, a class-weighted
cross-entropy over all queries of the batch, and BCE + dice on the matched pairs at
uncertainty-sampled points, summed and divided by the number of real targets of the (global)
batch. The random points of an image are drawn from keys folded with its index in the batch, so
they do not depend on how the batch is split (devices, micro-batches of gradient accumulation);
given the whole batch's labels, a micro-batch's terms are normalised as the whole batch's, and the
micro-batches' terms add up to the whole batch's. Terms `loss_ce_{l}`, `loss_mask_{l}`,
`loss_dice_{l}` (l = L - 1 is the final prediction) come weighted; the total is their sum.
Everything is computed in float32; the mask logits' gradient takes their dtype.

Cost: the matching of all L x B images runs at once (small). The mask losses run over the matched
(image, target slot) pairs, packed across images and taken B x `loss.slots_per_pass` at a time
for all predictions together, so their cost follows the batch's real targets rather than
`data.max_targets` or its most crowded image. Given the mesh, every device matches and packs its
own images only, so its loops are as long as they need. Each pass also computes its gradient with
respect to the mask logits (a custom VJP), so no per-point array outlives its pass and nothing is
recomputed.
"""
import functools
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from m2f_jax import parallel
from m2f_jax.losses import matcher
from m2f_jax.losses import point_sampling
from m2f_jax.losses import slot_passes

# shard_map specs over the data axis: arrays [L, B, ...] (per prediction) and [B, ...].
_LAYERS_BY_IMAGE = P(None, parallel.DATA_AXIS)
_BY_IMAGE = P(parallel.DATA_AXIS)

# Injected sampling points (tests, reproductions): 'matcher' [L, B, P, 2] uniform points of the
# matching cost; 'oversampled' [L, B, M, P_over, 2] candidates and 'fresh' [L, B, M, P_fresh, 2]
# uniform points of each target slot's mask loss. Without them, points are drawn from `rng`.
Points = Mapping[str, jax.Array]


def class_weight_total(labels: jax.Array, num_queries: int, no_object_weight: float) -> jax.Array:
  """The sum of the class loss's weights over all queries of the images of `labels` [B, M]:
  an image's matched queries weigh 1, the others `no_object_weight`. The matcher matches every
  real target, or every query when there are more targets, so min(real targets, Q) per image."""
  matched = jnp.minimum(jnp.sum(labels >= 0, axis=1), num_queries).astype(jnp.float32)
  return jnp.sum(no_object_weight * num_queries + (1.0 - no_object_weight) * matched)


def whole_batch_normalisers(whole_labels: jax.Array, num_queries: int,
                            no_object_weight: float) -> Tuple[jax.Array, jax.Array]:
  """What the terms are divided by: the whole batch's real targets (at least 1; the mask terms)
  and its `class_weight_total` (the class term), from its labels [B, M]. Under jit over global
  arrays these are global counts: per-device losses divided by them and summed over devices equal
  the authors' all-reduced average of per-device losses."""
  num_masks = jnp.maximum(jnp.sum(whole_labels >= 0).astype(jnp.float32), 1.0)
  return num_masks, class_weight_total(whole_labels, num_queries, no_object_weight)


def draw_matcher_points(match_key: jax.Array, image_index: jax.Array, num_layers: int,
                        num_points: int) -> jax.Array:
  """The matching cost's uniform points [L, B, P, 2]: image b's from fold_in(match_key,
  image_index[b]), so they do not depend on how the batch is split."""
  draw = lambda i: jax.random.uniform(jax.random.fold_in(match_key, i), (num_layers, num_points, 2))
  return jax.vmap(draw, out_axes=1)(image_index)


def _class_loss(class_logits: jax.Array, labels: jax.Array, query_for_target: jax.Array,
                matched: jax.Array, no_object_weight: float, weight_total: jax.Array) -> jax.Array:
  """Cross-entropy over all queries, weighted (F.cross_entropy with class weights), summed and
  divided by `weight_total`: the weighted mean when that is these images' `class_weight_total`.

  Args:
    class_logits: [B, Q, K+1].
    labels: int [B, M].
    query_for_target: int [B, M].
    matched: bool [B, M].
    no_object_weight: weight of the no-object class K.
    weight_total: float32 [], the sum of the weights to divide by.

  Returns:
    float32 [].
  """
  _, num_queries, num_logits = class_logits.shape
  no_object = num_logits - 1
  # Unmatched slots scatter out of bounds and are dropped, so they never overwrite a match. The
  # scatter is vmapped over images, so that with the batch sharded it stays on each device.
  query = jnp.where(matched, query_for_target, num_queries)
  target_class = jax.vmap(lambda rows, image_labels: jnp.full(num_queries, no_object, jnp.int32)
                          .at[rows].set(image_labels.astype(jnp.int32), mode="drop"))(query, labels)
  log_probs = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
  weight = jnp.where(target_class == no_object, no_object_weight, 1.0)
  return jnp.sum(weight * nll) / weight_total


def _pair_terms(logits: jax.Array, target: jax.Array
                ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """BCE and dice of (query, target) pairs at their points, and their gradients.

  Args:
    logits: [N, P] mask logits at the points.
    target: [N, P] target masks at the same points.

  Returns:
    bce [N], dice [N], and d bce / d logits, d dice / d logits [N, P] (PyTorch's autograd
    formulas: (sigmoid - target) / P, and the quotient rule through the sigmoid).
  """
  num_points = logits.shape[-1]
  probs = jax.nn.sigmoid(logits)
  bce = jnp.mean(jax.nn.softplus(logits) - logits * target, axis=-1)
  numerator = 2.0 * jnp.sum(probs * target, axis=-1, keepdims=True) + 1.0
  denominator = jnp.sum(probs, axis=-1, keepdims=True) + jnp.sum(target, axis=-1,
                                                                  keepdims=True) + 1.0
  dice = 1.0 - numerator / denominator
  d_bce = (probs - target) / num_points
  d_dice = (numerator - 2.0 * target * denominator) / (denominator * denominator)
  return bce, dice[:, 0], d_bce, d_dice * probs * (1.0 - probs)


def _mask_loss_sums(mask_logits: jax.Array, segment_ids: jax.Array, query_for_target: jax.Array,
                    matched: jax.Array, image_index: jax.Array, rng: jax.Array,
                    candidates: Optional[Points], loss_cfg: ml_collections.ConfigDict,
                    with_gradients: bool):
  """BCE and dice summed over the matched pairs, pass by pass over the used (image, slot) pairs.

  Each pass takes B x `loss.slots_per_pass` (image, slot) pairs of the packed used ones, gathers
  their maps in every prediction, picks their importance-sampled points (no gradient; drawn from
  a key of the image's `image_index` and the slot, so they do not depend on the packing) and
  evaluates the losses and, if asked, their gradients, which it scatter-adds into [L, B, Q, h, w]
  buffers. Nothing per pass outlives it. Arguments as `_mask_losses`; `with_gradients` also
  computes the gradients.

  Returns:
    (bce [L], dice [L]) and, with gradients, (d bce, d dice): each [L, B, Q, h, w] holding the
    gradient of every layer's sum with respect to that layer's mask logits.
  """
  num_layers, batch_size, _, height, width = mask_logits.shape
  num_slots = matched.shape[-1]
  per_pass = batch_size * loss_cfg.slots_per_pass
  num_over, num_uncertain, num_fresh = point_sampling.num_points_split(
      loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
  pairs = num_layers * per_pass
  layer = jnp.arange(num_layers)[:, None]

  def draw_points(pair_key: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """One pair's candidates [L, P_over, 2] and fresh points [L, P_fresh, 2]."""
    key_over, key_fresh = jax.random.split(pair_key)
    return (jax.random.uniform(key_over, (num_layers, num_over, 2)),
            jax.random.uniform(key_fresh, (num_layers, num_fresh, 2)))

  def pass_points(images: jax.Array, slots: jax.Array, maps: jax.Array) -> jax.Array:
    """Importance-sampled points of the pass's pairs: [L * per_pass, P, 2]."""
    if candidates is None:
      pair_ids = image_index[images] * num_slots + slots
      keys = jax.vmap(lambda pair: jax.random.fold_in(rng, pair))(pair_ids)
      oversampled, fresh = jax.vmap(draw_points, out_axes=1)(keys)  # [L, per_pass, *, 2] each
    else:
      oversampled = jnp.asarray(candidates["oversampled"])[:, images, slots]
      fresh = jnp.asarray(candidates["fresh"])[:, images, slots]
    return point_sampling.importance_points(maps, oversampled.reshape(pairs, -1, 2),
                                            fresh.reshape(pairs, -1, 2), num_uncertain,
                                            loss_cfg.get("uncertain_selection", "top_k"))

  def run_pass(images: jax.Array, slots: jax.Array, real: jax.Array, carry):
    queries = query_for_target[:, images, slots]  # [L, per_pass]
    maps = mask_logits[layer, images, queries].reshape(pairs, height, width)
    points = pass_points(images, slots, maps)  # [pairs, P, 2]
    logits, transpose = jax.vjp(lambda m: point_sampling.point_sample_each(m, points), maps)
    target = jax.vmap(point_sampling.sample_targets, in_axes=(0, 1, 0), out_axes=1)(
        segment_ids[images], points.reshape(num_layers, per_pass, -1, 2),
        jnp.broadcast_to(slots[:, None], (per_pass, num_layers)))
    bce, dice, d_bce, d_dice = _pair_terms(logits, target.reshape(pairs, -1))
    keep = (matched[:, images, slots] & real).reshape(pairs)  # a repeated pair counts once
    sums = tuple(s + jnp.sum(jnp.where(keep, t, 0.0).reshape(num_layers, -1), axis=1)
                 for s, t in zip(carry[0], (bce, dice)))
    if not with_gradients:
      return sums, ()
    cotangents = jnp.where(keep[:, None], jnp.stack([d_bce, d_dice]), 0.0)  # [2, pairs, P]
    grads = jax.vmap(lambda g: transpose(g)[0])(cotangents)
    grads = grads.reshape(2, num_layers, per_pass, height, width)
    return sums, tuple(buffer.at[layer, images, queries].add(g)
                       for buffer, g in zip(carry[1], grads))

  zeros = jnp.zeros(num_layers, jnp.float32)
  buffers = (jnp.zeros_like(mask_logits),) * 2 if with_gradients else ()
  return slot_passes.fold_used_pairs(run_pass, jnp.any(matched, axis=0), per_pass,
                                     ((zeros, zeros), buffers))


def _sharded_mask_loss_sums(mask_logits: jax.Array, segment_ids: jax.Array,
                            query_for_target: jax.Array, matched: jax.Array,
                            image_index: jax.Array, rng: jax.Array,
                            candidates: Optional[Points], loss_cfg: ml_collections.ConfigDict,
                            mesh: Optional[Mesh], with_gradients: bool):
  """`_mask_loss_sums` with every device packing the pairs of its own images.

  Under one jit over global arrays a device would run as many passes as the whole batch needs,
  and packing pairs across images would gather mask logits from other devices. So with a `mesh`
  the passes run under shard_map over its data axis: each device loops over its images' pairs
  only, and the sums are added over devices. Without one, the whole batch is packed together.
  """
  args = (mask_logits, segment_ids, query_for_target, matched, image_index, rng, candidates)
  if mesh is None:
    return _mask_loss_sums(*args, loss_cfg, with_gradients)

  def per_device(*local_args):
    sums, gradients = _mask_loss_sums(*local_args, loss_cfg, with_gradients)
    return jax.lax.psum(sums, parallel.DATA_AXIS), gradients

  in_specs = (_LAYERS_BY_IMAGE, _BY_IMAGE, _LAYERS_BY_IMAGE, _LAYERS_BY_IMAGE, _BY_IMAGE, P(),
              jax.tree.map(lambda _: _LAYERS_BY_IMAGE, candidates))
  out_specs = (P(), (_LAYERS_BY_IMAGE, _LAYERS_BY_IMAGE) if with_gradients else ())
  return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _mask_losses(mask_logits: jax.Array, segment_ids: jax.Array, query_for_target: jax.Array,
                 matched: jax.Array, image_index: jax.Array, rng: jax.Array,
                 candidates: Optional[Points], loss_cfg: ml_collections.ConfigDict,
                 mesh: Optional[Mesh]) -> Tuple[jax.Array, jax.Array]:
  """Sums of BCE and dice over the matched pairs of every prediction.

  The gradient with respect to `mask_logits` is computed in the forward pass, while each slot
  pass's points and maps are at hand, and kept as two [L, B, Q, h, w] arrays; the backward pass
  only weights them with the incoming cotangents. No per-pass array is stored or recomputed.

  Args:
    mask_logits: [L, B, Q, h, w], any float dtype: the losses are computed in float32, and the
      gradient buffers (and so the gradient) take this dtype, so a bfloat16 model's masks cost
      half. Each element receives at most one gradient term, so nothing accumulates in bfloat16.
    segment_ids: int [B, S, H, W].
    query_for_target: int [L, B, M].
    matched: bool [L, B, M].
    image_index: int [B], each image's index in the batch (its points' keys are folded with it).
    rng: key of the drawn points (unused when `candidates` is given).
    candidates: None, or injected 'oversampled' [L, B, M, P_over, 2], 'fresh' [L, B, M, *, 2].
    loss_cfg: cfg.loss.
    mesh: the data mesh the batch is sharded over, or None.

  Returns:
    (bce, dice) float32 [L], summed over the matched pairs of each prediction.
  """
  return _sharded_mask_loss_sums(mask_logits, segment_ids, query_for_target, matched, image_index,
                                 rng, candidates, loss_cfg, mesh, with_gradients=False)[0]


def _mask_losses_forward(mask_logits, segment_ids, query_for_target, matched, image_index, rng,
                         candidates, loss_cfg, mesh):
  return _sharded_mask_loss_sums(mask_logits, segment_ids, query_for_target, matched, image_index,
                                 rng, candidates, loss_cfg, mesh, with_gradients=True)


def _mask_losses_backward(loss_cfg, mesh, gradients, cotangents):
  del loss_cfg, mesh
  d_bce, d_dice = gradients
  ct_bce, ct_dice = (c[:, None, None, None, None] for c in cotangents)
  return ((ct_bce * d_bce + ct_dice * d_dice).astype(d_bce.dtype), None, None, None, None, None,
          None)


_mask_losses.defvjp(_mask_losses_forward, _mask_losses_backward)


def match_predictions(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                      matcher_points: jax.Array, loss_cfg: ml_collections.ConfigDict
                      ) -> Tuple[jax.Array, jax.Array]:
  """The matching of every prediction and image (no gradient).

  The costs come one prediction at a time (its [B, P, Q] point samples are the largest arrays of
  the matching); within it, the cost columns come `loss.slots_per_pass` slots at a time, in a loop
  over the passes that hold a target only. The L x B assignments then run as one batch: the
  solver's loop runs once for all of them instead of once per prediction.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w].
    batch: 'labels' int [B, M], 'segment_ids' int [B, S, H, W].
    matcher_points: [L, B, P, 2] uniform normalised (x, y) points.
    loss_cfg: cfg.loss.

  Returns:
    query_for_target int32 [L, B, M] and matched bool [L, B, M].
  """
  class_logits = jax.lax.stop_gradient(jnp.asarray(outputs["class_logits"]).astype(jnp.float32))
  mask_logits = jax.lax.stop_gradient(jnp.asarray(outputs["mask_logits"]))  # read in float32
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

    def pass_cost(index: jax.Array, cost: jax.Array) -> jax.Array:
      slots, _ = slot_passes.pass_slots(index, per_pass, num_slots)
      columns = costs(terms, labels[:, slots], segment_ids, points, slots)  # [B, Q, per_pass]
      return cost.at[:, :, slots].set(columns)  # a repeated slot M - 1 gets the same column

    no_cost = jnp.zeros((batch_size, num_queries, num_slots))  # padding slots are never matched
    return slot_passes.fold_occupied_passes(pass_cost, labels >= 0, per_pass, no_cost)

  cost = jax.lax.map(prediction_cost, (class_logits, mask_logits, matcher_points))  # [L, B, Q, M]
  return assign(cost, jnp.broadcast_to(labels >= 0, cost.shape[:2] + labels.shape[1:]))


def check_inputs(class_logits: jax.Array, mask_logits: jax.Array, labels: jax.Array,
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
  selection = loss_cfg.get("uncertain_selection", "top_k")
  if selection not in point_sampling.SELECTIONS:
    raise ValueError(f"loss.uncertain_selection must be one of {point_sampling.SELECTIONS}, got "
                     f"{selection!r}")


def mask2former_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                     rng: jax.Array, loss_cfg: ml_collections.ConfigDict, num_classes: int,
                     points: Optional[Points] = None, mesh: Optional[Mesh] = None,
                     image_index: Optional[jax.Array] = None,
                     whole_batch_labels: Optional[jax.Array] = None
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The authors' Mask2Former criterion over all L predictions.

  Args:
    outputs: 'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w] (any float dtype).
    batch: 'labels' int [B, M] (-1 = padding), 'segment_ids' int [B, S, H, W]; other keys ignored.
    rng: key for the random points (unused when `points` is given).
    loss_cfg: cfg.loss (class/mask/dice/no_object weights, num_points, oversample_ratio,
      importance_sample_ratio, matcher, slots_per_pass, uncertain_selection).
    num_classes: K.
    points: optional injected points with a leading L axis (see `Points`).
    mesh: the mesh whose data axis shards the batch (train steps); each device then runs the mask
      losses over its own images' targets. None: one device's view of the whole batch.
    image_index: int [B], each image's index in the whole batch (default 0..B-1); the keys of its
      random points are folded with it, so a micro-batch draws its images' whole-batch points.
    whole_batch_labels: int [B_whole, M], the labels of the whole batch when `batch` is a
      micro-batch of it (default: batch['labels']); the terms are normalised by its counts (real
      targets, class weights), so the micro-batches' terms add up to the whole batch's.

  Returns:
    total float32 [] and {'loss_ce_{l}', 'loss_mask_{l}', 'loss_dice_{l}': float32 []} (weighted).
  """
  class_logits = jnp.asarray(outputs["class_logits"]).astype(jnp.float32)
  mask_logits = jnp.asarray(outputs["mask_logits"])  # kept in its dtype: see `_mask_losses`
  labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
  segment_ids = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
  check_inputs(class_logits, mask_logits, labels, segment_ids, loss_cfg, num_classes)
  num_layers, batch_size, num_queries = class_logits.shape[:3]
  image_index = (jnp.arange(batch_size, dtype=jnp.int32) if image_index is None
                 else jnp.asarray(image_index).astype(jnp.int32))
  whole_labels = labels if whole_batch_labels is None else jnp.asarray(whole_batch_labels)
  num_masks, weight_total = whole_batch_normalisers(whole_labels, num_queries,
                                                   loss_cfg.no_object_weight)
  match_key, pair_key = jax.random.split(rng)
  if points is None:
    matcher_points = draw_matcher_points(match_key, image_index, num_layers, loss_cfg.num_points)
    candidates = None
  else:
    matcher_points = points["matcher"]
    candidates = {"oversampled": points["oversampled"], "fresh": points["fresh"]}
  match = functools.partial(match_predictions, loss_cfg=loss_cfg)
  if mesh is not None:  # every device matches its own images, its cost loop as long as they need
    match = jax.shard_map(match, mesh=mesh,
                          in_specs=(_LAYERS_BY_IMAGE, _BY_IMAGE, _LAYERS_BY_IMAGE),
                          out_specs=(_LAYERS_BY_IMAGE, _LAYERS_BY_IMAGE), check_vma=False)
  query_for_target, matched = match(
      jax.lax.stop_gradient({"class_logits": class_logits, "mask_logits": mask_logits}),
      {"labels": labels, "segment_ids": segment_ids}, matcher_points)
  loss_ce = jax.vmap(lambda cls, rows, ok: _class_loss(cls, labels, rows, ok,
                                                       loss_cfg.no_object_weight, weight_total))(
      class_logits, query_for_target, matched)
  bce, dice = _mask_losses(mask_logits, segment_ids, query_for_target, matched, image_index,
                           pair_key, candidates, loss_cfg, mesh)
  return weighted_terms(loss_cfg, loss_ce, bce / num_masks, dice / num_masks)


def weighted_terms(loss_cfg: ml_collections.ConfigDict, loss_ce: jax.Array, loss_mask: jax.Array,
                   loss_dice: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The weighted total and the terms {'loss_ce_{l}', 'loss_mask_{l}', 'loss_dice_{l}'} of the
  normalised per-prediction losses, each float32 [L]."""
  loss_ce = loss_cfg.class_weight * loss_ce
  loss_mask = loss_cfg.mask_weight * loss_mask
  loss_dice = loss_cfg.dice_weight * loss_dice
  terms = {}
  for layer in range(loss_ce.shape[0]):
    terms[f"loss_ce_{layer}"] = loss_ce[layer]
    terms[f"loss_mask_{layer}"] = loss_mask[layer]
    terms[f"loss_dice_{layer}"] = loss_dice[layer]
  return jnp.sum(loss_ce) + jnp.sum(loss_mask) + jnp.sum(loss_dice), terms
