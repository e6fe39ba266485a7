"""Matching: the in-graph Hungarian solver against scipy, and the cost against transformers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
from transformers.models.mask2former import modeling_mask2former as hf

from m2f_jax.losses import matcher

# (Q, M, kind, count): 1,050 padded cost matrices; Q < M included; 'positive' costs all exceed the
# padding slots' natural cost 0, 'int' costs are small integers (many ties), 'dup' has identical
# columns and rows.
CASES = [
    (200, 100, "float", 200),
    (100, 100, "float", 250),
    (60, 100, "positive", 150),
    (37, 23, "int", 250),
    (100, 60, "dup", 200),
]


def _random_problems(num_queries, num_slots, kind, count, seed):
  """cost float32 [N, Q, M] and valid bool [N, M] (random number and places of real slots)."""
  rng = np.random.default_rng(seed)
  if kind == "float":
    cost = rng.uniform(-2.0, 3.0, (count, num_queries, num_slots))
  elif kind == "positive":
    cost = rng.uniform(0.5, 3.0, (count, num_queries, num_slots))
  elif kind == "int":
    cost = rng.integers(0, 4, (count, num_queries, num_slots))
  else:
    base = rng.integers(0, 3, (count, num_queries // 4, num_slots // 4))
    cost = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2) + rng.integers(0, 2, (count, 1, 1))
  num_real = rng.integers(0, num_slots + 1, count)
  num_real[:3] = [0, num_slots, min(num_queries, num_slots)]
  valid = np.zeros((count, num_slots), bool)
  for i, n in enumerate(num_real):
    valid[i, rng.permutation(num_slots)[:n]] = True
  return cost.astype(np.float32), valid


@functools.lru_cache(maxsize=None)
def _batched_assign(solver):
  return jax.jit(jax.vmap(functools.partial(matcher.assign, solver=solver)))


def _check_against_scipy(cost, valid, query_for_target, matched):
  """Asserts each assignment is a valid matching of the real slots with scipy's optimal cost."""
  num_queries = cost.shape[1]
  for c, v, q, m in zip(cost, valid, query_for_target, matched):
    assert not np.any(m & ~v), "a padding slot was matched"
    real = np.flatnonzero(v)
    assert m.sum() == min(num_queries, real.size)
    assert np.unique(q[m]).size == m.sum(), "a query was matched twice"
    rows, cols = scipy.optimize.linear_sum_assignment(c[:, real].astype(np.float64))
    optimum = c[:, real][rows, cols].astype(np.float64).sum()
    ours = c[q[m], np.flatnonzero(m)].astype(np.float64).sum()
    np.testing.assert_allclose(ours, optimum, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("solver", ["hungarian", "scipy"])
@pytest.mark.parametrize("num_queries,num_slots,kind,count", CASES)
def test_assignment_is_optimal(solver, num_queries, num_slots, kind, count):
  cost, valid = _random_problems(num_queries, num_slots, kind, count, seed=num_queries + num_slots)
  query_for_target, matched = _batched_assign(solver)(jnp.asarray(cost), jnp.asarray(valid))
  _check_against_scipy(cost, valid, np.asarray(query_for_target), np.asarray(matched))


def test_scipy_callback_under_nested_vmap_and_non_finite_costs():
  cost, valid = _random_problems(9, 6, "float", 8, seed=3)
  cost[0, 2, :] = np.nan
  cost[1, :, 0] = np.inf
  nested = jax.jit(jax.vmap(jax.vmap(functools.partial(matcher.assign, solver="scipy"))))
  in_graph = jax.jit(jax.vmap(jax.vmap(matcher.assign)))
  shape = (2, 4) + cost.shape[1:]
  q_scipy, m_scipy = nested(cost.reshape(shape), valid.reshape(2, 4, -1))
  q_graph, m_graph = in_graph(cost.reshape(shape), valid.reshape(2, 4, -1))
  np.testing.assert_array_equal(np.asarray(m_scipy).reshape(valid.shape), valid)
  np.testing.assert_array_equal(np.asarray(m_graph), np.asarray(m_scipy))
  finite = np.nan_to_num(cost, nan=1e6, posinf=1e6)
  _check_against_scipy(finite, valid, np.asarray(q_graph).reshape(valid.shape),
                       np.asarray(m_graph).reshape(valid.shape))
  assert np.asarray(q_scipy)[0, 0][valid[0]].tolist().count(2) == 0, "NaN row matched"


def test_unknown_solver_is_rejected():
  with pytest.raises(ValueError, match="loss.matcher"):
    matcher.assign(jnp.zeros((3, 2)), jnp.ones(2, bool), solver="greedy")


def test_matching_cost_equals_transformers():
  """The cost of transformers' matcher (its own functions) on the same points."""
  rng = np.random.default_rng(0)
  num_queries, num_classes, num_points = 9, 5, 50
  class_logits = rng.normal(size=(num_queries, num_classes + 1)).astype(np.float32)
  mask_logits = (2 * rng.normal(size=(num_queries, 6, 5))).astype(np.float32)
  segment_ids = rng.integers(0, 5, size=(2, 24, 20)).astype(np.int32)
  labels = np.array([3, -1, 0, 3, -1], np.int32)
  points = rng.uniform(size=(num_points, 2)).astype(np.float32)
  weights = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
  ours = np.asarray(matcher.matching_cost(jnp.asarray(class_logits), jnp.asarray(mask_logits),
                                          jnp.asarray(labels), jnp.asarray(segment_ids),
                                          jnp.asarray(points), **weights))
  real = np.flatnonzero(labels >= 0)
  dense = np.stack([(segment_ids == m + 1).any(0) for m in real]).astype(np.float32)
  pts = torch.from_numpy(points)[None]
  target = hf.sample_point(torch.from_numpy(dense)[:, None], pts.repeat(len(real), 1, 1),
                           align_corners=False).squeeze(1)
  pred = hf.sample_point(torch.from_numpy(mask_logits)[:, None], pts.repeat(num_queries, 1, 1),
                         align_corners=False).squeeze(1)
  expected = (5.0 * hf.pair_wise_sigmoid_cross_entropy_loss(pred, target)
              + 5.0 * hf.pair_wise_dice_loss(pred, target)
              - 2.0 * torch.from_numpy(class_logits).softmax(-1)[:, labels[real]]).numpy()
  np.testing.assert_allclose(ours[:, real], expected, rtol=1e-5, atol=1e-5)
