"""Per-target-slot work in passes of a few slots, skipping the passes that hold no target.

A batch pads its targets to M slots (`data.max_targets`, 100 for COCO) but a typical image has
a handful. Running the per-slot work (matching-cost columns, mask losses) `per_pass` slots at a
time under `lax.cond` makes its cost follow the slots in use rather than M, with static shapes.
"""
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp


def num_passes(num_slots: int, per_pass: int) -> int:
  """ceil(M / per_pass)."""
  return -(-num_slots // per_pass)


def pass_slots(index: jax.Array, per_pass: int, num_slots: int) -> Tuple[jax.Array, jax.Array]:
  """Slots of pass `index`: int32 [per_pass] clipped into [0, M), and bool [per_pass] marking the
  ones below M (the last pass may reach past M and then repeats slot M - 1). An index of shape
  [..., 1] gives [..., per_pass] for several passes at once."""
  slots = index * per_pass + jnp.arange(per_pass, dtype=jnp.int32)
  return jnp.minimum(slots, num_slots - 1), slots < num_slots


def map_passes(run_pass: Callable[[jax.Array, Any], Any], occupied: jax.Array, per_pass: int,
               skipped: Any, xs: Any = None, remat: bool = False) -> Any:
  """[run_pass(index, xs[index]) for each pass], stacked along a new leading axis.

  Args:
    run_pass: (index int32 [], the pass's slice of `xs`) -> pytree shaped like `skipped`.
    occupied: bool [..., M]; a pass whose slots are all False returns `skipped` unrun.
    per_pass: slots per pass.
    skipped: the result of an unrun pass (zeros).
    xs: optional pytree with a leading axis of num_passes(M, per_pass).
    remat: rematerialise each pass in the backward pass (its residuals are then its inputs:
      the index, its `xs` slice and loop-invariant values), instead of storing its
      intermediates for every pass.

  Returns:
    pytree with leading axis num_passes(M, per_pass).
  """
  num_slots = occupied.shape[-1]

  def one_pass(index, x):
    slots, _ = pass_slots(index, per_pass, num_slots)
    return jax.lax.cond(jnp.any(occupied[..., slots]), lambda: run_pass(index, x),
                        lambda: skipped)

  if remat:
    one_pass = jax.checkpoint(one_pass, prevent_cse=False)
  passes = jnp.arange(num_passes(num_slots, per_pass), dtype=jnp.int32)
  return jax.lax.scan(lambda _, inputs: (None, one_pass(*inputs)), None, (passes, xs))[1]
