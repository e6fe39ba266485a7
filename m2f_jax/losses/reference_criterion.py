"""The authors' SetCriterion written plainly: the reference of `criterion.mask2former_loss`.

Per prediction and image, as the authors' code reads: Hungarian matching (`matcher`), the
class-weighted cross-entropy over all queries, and BCE + dice at importance-sampled points of
every matched (query, target) pair, all pairs at once, differentiated by autodiff. It draws the
same random points as the packed criterion (the same keys), so the two agree to float32 rounding
(tests/test_criterion_reference.py); select it with `loss.criterion = 'reference'`.

Cost: every target slot of every image and prediction holds its 3P candidate points and P
sampled logits at once, L x B x M x 4P values, and autodiff keeps them for the backward pass;
the packed criterion holds one pass of pairs at a time (docs/criterion.md has both measured).
"""
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from m2f_jax import parallel
from m2f_jax.losses import criterion
from m2f_jax.losses import matcher
from m2f_jax.losses import point_sampling


def _match(class_logits: jax.Array, mask_logits: jax.Array, labels: jax.Array,
           segment_ids: jax.Array, points: jax.Array, loss_cfg: ml_collections.ConfigDict
           ) -> Tuple[jax.Array, jax.Array]:
  """query_for_target int32 [L, B, M] and matched bool [L, B, M] of every prediction and image;
  arguments [L, B, ...] outputs, [B, ...] targets and matcher points [L, B, P, 2]."""
  cost = functools.partial(matcher.matching_cost, class_weight=loss_cfg.class_weight,
                           mask_weight=loss_cfg.mask_weight, dice_weight=loss_cfg.dice_weight)
  cost = jax.vmap(jax.vmap(cost), in_axes=(0, 0, None, None, 0))(
      class_logits, mask_logits, labels, segment_ids, points)  # [L, B, Q, M]
  valid = jnp.broadcast_to(labels >= 0, cost.shape[:2] + labels.shape[1:])
  assign = functools.partial(matcher.assign, solver=loss_cfg.matcher)
  return jax.vmap(jax.vmap(assign))(cost, valid)


def _class_nll_sums(class_logits: jax.Array, labels: jax.Array, query_for_target: jax.Array,
                    matched: jax.Array, no_object_weight: float) -> jax.Array:
  """Weighted cross-entropy summed over all queries of each prediction: float32 [L].

  A matched query's target is its target's class, every other query's the no-object class K.
  Arguments: class_logits [L, B, Q, K+1], labels [B, M], query_for_target and matched [L, B, M].
  """
  num_queries, no_object = class_logits.shape[2], class_logits.shape[3] - 1
  assigned = jax.nn.one_hot(query_for_target, num_queries) * matched[..., None]  # [L, B, M, Q]
  target_of_query = jnp.einsum("lbmq,bm->lbq", assigned, labels.astype(jnp.float32))
  target_class = jnp.where(jnp.sum(assigned, axis=2) > 0, jnp.round(target_of_query),
                           no_object).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]
  weight = jnp.where(target_class == no_object, no_object_weight, 1.0)
  return jnp.sum(weight * nll, axis=(1, 2))


def _mask_loss_sums(mask_logits: jax.Array, segment_ids: jax.Array, query_for_target: jax.Array,
                    matched: jax.Array, image_index: jax.Array, pair_key: jax.Array,
                    loss_cfg: ml_collections.ConfigDict) -> Tuple[jax.Array, jax.Array]:
  """BCE and dice summed over the matched pairs of each prediction: (float32 [L], float32 [L]).

  Target slot m of image b draws its points from fold_in(pair_key, image_index[b] * M + m), as
  the packed criterion does. Arguments: mask_logits [L, B, Q, h, w], segment_ids [B, S, H, W],
  query_for_target and matched [L, B, M], image_index [B].
  """
  num_layers, batch_size, _, height, width = mask_logits.shape
  num_slots = matched.shape[-1]
  num_over, num_uncertain, num_fresh = point_sampling.num_points_split(
      loss_cfg.num_points, loss_cfg.oversample_ratio, loss_cfg.importance_sample_ratio)
  # The matched query's map of every (prediction, image, slot): [L, B, M, h, w].
  maps = jnp.take_along_axis(mask_logits, query_for_target[..., None, None], axis=2)

  def draw(image: jax.Array, slot: jax.Array) -> Tuple[jax.Array, jax.Array]:
    key_over, key_fresh = jax.random.split(jax.random.fold_in(pair_key, image * num_slots + slot))
    return (jax.random.uniform(key_over, (num_layers, num_over, 2)),
            jax.random.uniform(key_fresh, (num_layers, num_fresh, 2)))

  slots = jnp.arange(num_slots)
  oversampled, fresh = jax.vmap(jax.vmap(draw, in_axes=(None, 0)), in_axes=(0, None))(
      image_index, slots)  # [B, M, L, *, 2] each
  pairs = num_layers * batch_size * num_slots
  to_pairs = lambda x: jnp.moveaxis(x, 2, 0).reshape(pairs, -1, 2)  # [L * B * M, *, 2]
  flat_maps = maps.reshape(pairs, height, width)
  points = point_sampling.importance_points(flat_maps, to_pairs(oversampled), to_pairs(fresh),
                                            num_uncertain,
                                            loss_cfg.get("uncertain_selection", "top_k"))
  logits = point_sampling.point_sample_each(flat_maps, points).reshape(
      num_layers, batch_size, num_slots, -1)
  image_points = jnp.moveaxis(points.reshape(num_layers, batch_size, num_slots, -1, 2), 1, 0)
  target = jax.vmap(point_sampling.sample_targets)(
      segment_ids, image_points.reshape(batch_size, num_layers * num_slots, -1, 2),
      jnp.tile(slots, (batch_size, num_layers)))  # [B, L * M, P]
  target = jnp.moveaxis(target.reshape(batch_size, num_layers, num_slots, -1), 0, 1)

  bce = jnp.mean(jax.nn.softplus(logits) - logits * target, axis=-1)  # [L, B, M]
  probs = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * jnp.sum(probs * target, axis=-1) + 1.0) / (
      jnp.sum(probs, axis=-1) + jnp.sum(target, axis=-1) + 1.0)
  return (jnp.sum(jnp.where(matched, bce, 0.0), axis=(1, 2)),
          jnp.sum(jnp.where(matched, dice, 0.0), axis=(1, 2)))


def reference_loss(outputs, batch, rng: jax.Array, loss_cfg: ml_collections.ConfigDict,
                   num_classes: int, mesh: Optional[Mesh] = None,
                   image_index: Optional[jax.Array] = None,
                   whole_batch_labels: Optional[jax.Array] = None
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The Mask2Former criterion over all L predictions; arguments and result as
  `criterion.mask2former_loss` (without injected points). With a `mesh`, every device computes
  the sums of its own images and the sums are added over the devices."""
  class_logits = jnp.asarray(outputs["class_logits"]).astype(jnp.float32)
  mask_logits = jnp.asarray(outputs["mask_logits"]).astype(jnp.float32)
  labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
  segment_ids = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
  criterion.check_inputs(class_logits, mask_logits, labels, segment_ids, loss_cfg, num_classes)
  num_layers, batch_size, num_queries = class_logits.shape[:3]
  image_index = (jnp.arange(batch_size, dtype=jnp.int32) if image_index is None
                 else jnp.asarray(image_index).astype(jnp.int32))
  whole_labels = labels if whole_batch_labels is None else jnp.asarray(whole_batch_labels)
  num_masks, weight_total = criterion.whole_batch_normalisers(whole_labels, num_queries,
                                                             loss_cfg.no_object_weight)
  match_key, pair_key = jax.random.split(rng)
  matcher_points = criterion.draw_matcher_points(match_key, image_index, num_layers,
                                                 loss_cfg.num_points)  # [L, B, P, 2]

  def local_sums(class_logits, mask_logits, labels, segment_ids, matcher_points, image_index):
    query_for_target, matched = _match(
        jax.lax.stop_gradient(class_logits), jax.lax.stop_gradient(mask_logits), labels,
        segment_ids, matcher_points, loss_cfg)
    nll = _class_nll_sums(class_logits, labels, query_for_target, matched,
                          loss_cfg.no_object_weight)
    bce, dice = _mask_loss_sums(mask_logits, segment_ids, query_for_target, matched, image_index,
                                pair_key, loss_cfg)
    return nll, bce, dice

  sums = local_sums
  if mesh is not None:
    by_layer_image, by_image = P(None, parallel.DATA_AXIS), P(parallel.DATA_AXIS)
    per_device = lambda *args: jax.lax.psum(local_sums(*args), parallel.DATA_AXIS)
    sums = jax.shard_map(per_device, mesh=mesh, out_specs=P(), check_vma=False, in_specs=(
        by_layer_image, by_layer_image, by_image, by_image, by_layer_image, by_image))
  nll, bce, dice = sums(class_logits, mask_logits, labels, segment_ids, matcher_points,
                        image_index)
  return criterion.weighted_terms(loss_cfg, nll / weight_total, bce / num_masks,
                                  dice / num_masks)
