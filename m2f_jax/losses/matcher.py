"""Hungarian matching of predicted queries to padded target slots (one image; vmap for more).

Cost = class_weight * (-softmax probability of the target class) + mask_weight * mean sigmoid
BCE + dice_weight * dice, the mask terms on points drawn uniformly once per image and shared by
every query and target (the authors' memory-efficient matcher). Padded target slots (label -1)
are left out of the assignment. Everything runs in float32 and carries no gradient.
"""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from m2f_jax.losses import hungarian
from m2f_jax.losses import point_sampling

SOLVERS = ("hungarian", "scipy")

# Non-finite costs (a diverged model) become this, so that neither solver loops or raises; the
# authors' scipy call would raise instead.
_NON_FINITE_COST = 1e6

_HIGHEST = jax.lax.Precision.HIGHEST


def query_terms(class_logits: jax.Array, mask_logits: jax.Array,
                points: jax.Array) -> Dict[str, jax.Array]:
  """The per-query parts of the matching cost of one image, shared by all its target slots.

  Args:
    class_logits: [Q, K+1].
    mask_logits: [Q, h, w].
    points: [P, 2] normalised (x, y), shared by all queries and targets.

  Returns:
    'probs' [Q, K+1] class probabilities, 'logits' [P, Q] and 'sigmoid' [P, Q] at the points,
    'softplus_mean' [Q] and 'sigmoid_sum' [Q].
  """
  logits = point_sampling.point_sample(mask_logits, points)  # [P, Q]
  sigmoid = jax.nn.sigmoid(logits)
  return {"probs": jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1), "logits": logits,
          "sigmoid": sigmoid, "softplus_mean": jnp.mean(jax.nn.softplus(logits), axis=0),
          "sigmoid_sum": jnp.sum(sigmoid, axis=0)}


def slot_costs(terms: Dict[str, jax.Array], labels: jax.Array, segment_ids: jax.Array,
               points: jax.Array, slots: jax.Array, *, class_weight: float, mask_weight: float,
               dice_weight: float) -> jax.Array:
  """The matching cost of every query against some target slots of one image.

  Args:
    terms: `query_terms` of the image.
    labels: int [N] class ids of the slots (-1 = padding; its column is meaningless).
    segment_ids: int [S, H, W]; target slot m covers pixels with value m + 1 in any layer.
    points: [P, 2], the points of `terms`.
    slots: int [N] target slots.
    class_weight: weight of the class cost.
    mask_weight: weight of the BCE cost.
    dice_weight: weight of the dice cost.

  Returns:
    float32 [Q, N].
  """
  cost_class = -jnp.take(terms["probs"], jnp.clip(labels, 0), axis=1)  # [Q, N]
  target = point_sampling.sample_targets(segment_ids, points, slots)  # [N, P]
  # mean over points of BCE(x, t) = softplus(x) - x * t
  cost_mask = terms["softplus_mean"][:, None] - jnp.einsum(
      "pq,np->qn", terms["logits"], target, precision=_HIGHEST) / points.shape[0]
  numerator = 2.0 * jnp.einsum("pq,np->qn", terms["sigmoid"], target, precision=_HIGHEST)
  denominator = terms["sigmoid_sum"][:, None] + jnp.sum(target, axis=-1)[None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  return class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice


def matching_cost(class_logits: jax.Array, mask_logits: jax.Array, labels: jax.Array,
                  segment_ids: jax.Array, points: jax.Array, *, class_weight: float,
                  mask_weight: float, dice_weight: float) -> jax.Array:
  """The authors' matching cost of every (query, target slot) pair of one image.

  Args:
    class_logits: [Q, K+1].
    mask_logits: [Q, h, w].
    labels: int [M] class ids (-1 = padding slot; its column is meaningless).
    segment_ids: int [S, H, W]; target m covers pixels with value m + 1 in any layer.
    points: [P, 2] normalised (x, y), shared by all queries and targets.
    class_weight: weight of the class cost.
    mask_weight: weight of the BCE cost.
    dice_weight: weight of the dice cost.

  Returns:
    float32 [Q, M].
  """
  return slot_costs(query_terms(class_logits, mask_logits, points), labels, segment_ids, points,
                    jnp.arange(labels.shape[0]), class_weight=class_weight,
                    mask_weight=mask_weight, dice_weight=dice_weight)


def _finite(cost: jax.Array) -> jax.Array:
  return jnp.nan_to_num(cost, nan=_NON_FINITE_COST, posinf=_NON_FINITE_COST,
                        neginf=-_NON_FINITE_COST)


def _assign_in_graph(cost: jax.Array, valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Shortest augmenting paths over the real slots only (`hungarian.assign_rows`).

  Targets are the rows while they are no more than the queries; otherwise (only possible when
  M > Q) the queries are, and some targets stay unmatched, as in scipy on the real columns.
  """
  num_queries, num_targets = cost.shape

  def targets_as_rows():
    query_for_target = hungarian.assign_rows(cost.T, valid, jnp.ones(num_queries, bool))
    return jnp.maximum(query_for_target, 0), valid

  def queries_as_rows():
    target_for_query = hungarian.assign_rows(cost, jnp.ones(num_queries, bool), valid)
    query_for_target = jnp.zeros(num_targets, jnp.int32).at[target_for_query].set(
        jnp.arange(num_queries, dtype=jnp.int32))
    return query_for_target, jnp.zeros(num_targets, bool).at[target_for_query].set(True)

  if num_targets <= num_queries:
    return targets_as_rows()
  return jax.lax.cond(jnp.sum(valid) <= num_queries, targets_as_rows, queries_as_rows)


def _scipy_assign_host(cost: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """scipy on the real columns of each matrix; cost [..., Q, M], valid [..., M]."""
  cost, valid = np.asarray(cost), np.asarray(valid)
  query_for_target = np.zeros(valid.shape, np.int32)
  matched = np.zeros(valid.shape, bool)
  for index in np.ndindex(valid.shape[:-1]):
    real = np.flatnonzero(valid[index])
    rows, cols = scipy.optimize.linear_sum_assignment(cost[index][:, real])
    query_for_target[index][real[cols]] = rows
    matched[index][real[cols]] = True
  return query_for_target, matched


def _assign_scipy(cost: jax.Array, valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """scipy.optimize.linear_sum_assignment through a host callback (vmap-able)."""
  result_shapes = (jax.ShapeDtypeStruct(valid.shape, jnp.int32),
                   jax.ShapeDtypeStruct(valid.shape, jnp.bool_))
  return jax.pure_callback(_scipy_assign_host, result_shapes, cost, valid,
                           vmap_method="broadcast_all")


def assign(cost: jax.Array, valid: jax.Array, solver: str = "hungarian"
           ) -> Tuple[jax.Array, jax.Array]:
  """Minimum-cost assignment of queries to the valid target slots.

  Args:
    cost: [Q, M] (non-finite entries are replaced by a large finite cost).
    valid: bool [M], False for padding slots.
    solver: 'hungarian' (in-graph, `hungarian.assign_rows`) or 'scipy' (host callback).

  Returns:
    query_for_target int32 [M] (the query matched to each slot; 0 where unmatched) and
    matched bool [M] (a real slot that got a query: all of them unless M > Q).
  """
  if solver not in SOLVERS:
    raise ValueError(f"loss.matcher must be one of {SOLVERS}, got {solver!r}")
  cost = _finite(jax.lax.stop_gradient(cost).astype(jnp.float32))
  if solver == "hungarian":
    return _assign_in_graph(cost, valid)
  return _assign_scipy(cost, valid)
