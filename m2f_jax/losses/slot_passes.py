"""Per-target-slot work in passes of a few slots, skipping the passes that hold no target.

A batch pads its targets to M slots (`data.max_targets`, 100 for COCO) but a typical image has
a handful. Running the per-slot work (matching-cost columns, mask losses) a few slots at a time,
in a loop over the passes that hold a slot in use, makes its cost follow the slots in use rather
than M, with static shapes. `fold_occupied_passes` takes the same slots of every image in a pass;
`fold_used_pairs` packs the used (image, slot) pairs of all images, so an image with many targets
does not make the others loop through their empty slots.
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


def fold_occupied_passes(update: Callable[[jax.Array, Any], Any], occupied: jax.Array,
                         per_pass: int, init: Any) -> Any:
  """`update(index, carry)` applied to `init` for each pass holding an occupied slot, in order.

  A loop with as many steps as occupied passes: the passes without one cost nothing, and no
  per-pass result is stacked. Not reverse-differentiable (a while loop); callers that need a
  gradient compute it inside `update`.

  Args:
    update: (index int32 [], carry) -> carry of the same structure.
    occupied: bool [..., M].
    per_pass: slots per pass.
    init: the initial carry.
  """
  num_slots = occupied.shape[-1]
  passes = jnp.arange(num_passes(num_slots, per_pass), dtype=jnp.int32)[:, None]
  slots, _ = pass_slots(passes, per_pass, num_slots)  # [passes, per_pass]
  by_pass = occupied.reshape(-1, num_slots)[:, slots]  # [rest, passes, per_pass]
  pass_occupied = jnp.any(by_pass, axis=(0, 2))  # [passes]
  order = jnp.argsort(~pass_occupied, stable=True).astype(jnp.int32)  # occupied passes first
  return jax.lax.fori_loop(0, jnp.sum(pass_occupied, dtype=jnp.int32),
                           lambda k, carry: update(order[k], carry), init)


def fold_used_pairs(update: Callable[[jax.Array, jax.Array, jax.Array, Any], Any],
                    used: jax.Array, per_pass: int, init: Any) -> Any:
  """`update(images, slots, real, carry)` applied to `init` for the used pairs, `per_pass` a pass.

  The pairs of all images are packed, used ones first (image-major), so the loop runs
  ceil(used pairs / per_pass) times however they spread over the images. A pass may end with
  unused pairs (its caller masks them) and, in the last pass, positions past B x M (`real`
  False), which repeat the last pair.

  Args:
    update: (images int32 [per_pass], slots int32 [per_pass], real bool [per_pass], carry) -> carry.
    used: bool [B, M].
    per_pass: pairs per pass.
    init: the initial carry.
  """
  num_slots = used.shape[-1]
  flat = used.reshape(-1)
  order = jnp.argsort(~flat, stable=True).astype(jnp.int32)  # used pairs first

  def run_pass(index: jax.Array, carry: Any) -> Any:
    position = index * per_pass + jnp.arange(per_pass, dtype=jnp.int32)
    pair = order[jnp.minimum(position, flat.size - 1)]
    return update(pair // num_slots, pair % num_slots, position < flat.size, carry)

  return jax.lax.fori_loop(0, num_passes(jnp.sum(flat, dtype=jnp.int32), per_pass), run_pass, init)
