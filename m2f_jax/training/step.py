"""The train step: one jax.jit over global arrays (batch sharded P('data'), state replicated),
optionally accumulating the gradients of several micro-batches before one update."""
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m2f_jax import host_memory
from m2f_jax import parallel
from m2f_jax.training.state import TrainState

# loss_fn(outputs, batch, rng) -> (total float32 [], {name: float32 []}). Besides the model inputs
# the batch holds 'image_index' int32 [b] (each image's index in the global batch) and
# 'whole_batch_labels' int32 [B, M] (the global batch's labels): with gradient accumulation it is
# one micro-batch of b images, and its loss must be normalised as the whole batch's, so that the
# micro-batches' losses add up to the global batch's.
LossFn = Callable[[Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, Mapping[str, jax.Array]]]

MODEL_INPUT_KEYS = ("image", "valid_hw", "labels", "segment_ids")


def default_loss_fn(cfg: ml_collections.ConfigDict, mesh: Mesh) -> LossFn:
  """The Mask2Former criterion cfg.loss.criterion ('packed': `criterion.mask2former_loss`;
  'reference': `reference_criterion.reference_loss`) with cfg.loss and cfg.model.num_classes, for
  batches sharded over `mesh` (each device computes the losses of its own images); a batch
  without 'image_index' and 'whole_batch_labels' is a whole batch."""
  from m2f_jax.losses import criterion  # pylint: disable=g-import-not-at-top
  from m2f_jax.losses import reference_criterion  # pylint: disable=g-import-not-at-top
  criteria = {"packed": criterion.mask2former_loss, "reference": reference_criterion.reference_loss}
  name = cfg.loss.get("criterion", "packed")
  if name not in criteria:
    raise ValueError(f"loss.criterion must be one of {tuple(criteria)}, got {name!r}")

  def loss_fn(outputs, batch, rng):
    return criteria[name](outputs, batch, rng, cfg.loss, cfg.model.num_classes, mesh=mesh,
                          image_index=batch.get("image_index"),
                          whole_batch_labels=batch.get("whole_batch_labels"))

  return loss_fn


def check_grad_accum_steps(batch_size: int, grad_accum_steps: Any, num_devices: int) -> None:
  """Raises ValueError unless the global batch splits into `grad_accum_steps` micro-batches with
  the same number of images on every device."""
  if not isinstance(grad_accum_steps, int) or isinstance(grad_accum_steps, bool) or (
      grad_accum_steps < 1):
    raise ValueError(
        f"config.grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
  if batch_size % (grad_accum_steps * num_devices):
    raise ValueError(f"batch_size {batch_size} must be a multiple of grad_accum_steps x device "
                     f"count = {grad_accum_steps} x {num_devices} (every micro-batch spreads over "
                     "all devices); change --config.batch_size or --config.grad_accum_steps")


def micro_batches(x: jax.Array, steps: int, mesh: Mesh) -> jax.Array:
  """[B, ...] sharded over the mesh's data axis -> [steps, B / steps, ...], micro-batch j made of
  the j-th B / (steps x devices) images of every device's share, so that no image moves."""
  devices = mesh.shape[parallel.DATA_AXIS]
  per_device = x.shape[0] // (steps * devices)
  x = x.reshape((devices, steps, per_device) + x.shape[1:]).swapaxes(0, 1)
  x = x.reshape((steps, devices * per_device) + x.shape[3:])
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.DATA_AXIS)))


def make_train_step(model: Any, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: Callable[[Any], jax.Array], mesh: Mesh, rng: jax.Array,
                    grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
  """A jitted `step(state, batch) -> (state, metrics)`; `state` is donated.

  The batch holds global arrays (`parallel.global_batch`): image uint8 [B, H, W, 3] (the model
  normalises it on device; training crops are padded with 128 before normalising, as the authors'
  mappers do, so no valid_hw masking here), labels [B, M],
  segment_ids [B, S, H, W].
  Randomness (dropout / drop-path, point sampling) comes from the key `rng` folded with the step,
  so a resumed run repeats an uninterrupted one. A non-finite loss or gradient norm leaves params,
  batch_stats and opt_state unchanged and counts the step in `state.skipped`.

  With `grad_accum_steps` k > 1 (config.grad_accum_steps) the batch is taken as k micro-batches
  of B / k images, each spread over all devices (`micro_batches`), in a `lax.scan`: one compiled
  body whose activations are those of one micro-batch. Their gradients, losses and BatchNorm
  statistic updates are summed, then one update is made. The loss normalises every micro-batch
  by the whole batch's counts and draws each image's points from its index in the whole batch,
  so the update is the one-batch update up to float rounding, except: sync BN normalises with
  each micro-batch's statistics (not the whole batch's; the running mean still gets the whole
  batch's mean, the running variance the mean of the micro-batches' variances), and drop path
  (Swin) draws its samples per micro-batch (key folded with the micro-batch index; the same
  distribution, other samples). Frozen BN has no statistics and is unaffected.

  Metrics (float32 scalars, replicated): 'loss', every loss term (of the whole batch),
  'grad_norm' (before clipping), 'learning_rate' (base lr of this step) and 'skipped' (1.0 when
  this update was skipped).
  """
  devices = mesh.shape[parallel.DATA_AXIS]

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    batch_size = batch["image"].shape[0]
    check_grad_accum_steps(batch_size, grad_accum_steps, devices)
    batch["image_index"] = jnp.arange(batch_size, dtype=jnp.int32)
    batch["whole_batch_labels"] = batch["labels"]
    dropout_key, loss_key = jax.random.split(jax.random.fold_in(rng, state.step))

    def gradients(micro_batch, micro_dropout_key):
      """(loss, terms, batch_stats, grads) of the images of `micro_batch`."""
      def objective(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, micro_batch["image"], train=True,
            rngs={"dropout": micro_dropout_key}, mutable=["batch_stats"])
        total, terms = loss_fn(outputs, micro_batch, loss_key)
        return total.astype(jnp.float32), (terms, updates.get("batch_stats", {}))

      (loss, (terms, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
      return loss, terms, stats, grads

    if grad_accum_steps == 1:
      loss, terms, batch_stats, grads = gradients(batch, dropout_key)
    else:
      whole_labels = batch.pop("whole_batch_labels")
      stacked = {k: micro_batches(v, grad_accum_steps, mesh) for k, v in batch.items()}

      def micro_step(micro):
        """(loss, terms, change of batch_stats, grads) of micro-batch `micro` = (batch, index)."""
        micro_batch, index = micro
        micro_batch = dict(micro_batch, whole_batch_labels=whole_labels)
        loss, terms, stats, grads = gradients(micro_batch, jax.random.fold_in(dropout_key, index))
        return loss, terms, jax.tree.map(jnp.subtract, stats, state.batch_stats), grads

      xs = (stacked, jnp.arange(grad_accum_steps))
      shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], xs))
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      (loss, terms, stats_change, grads), _ = jax.lax.scan(
          lambda sums, micro: (jax.tree.map(jnp.add, sums, micro_step(micro)), None), zeros, xs)
      batch_stats = jax.tree.map(lambda old, change: old + change / grad_accum_steps,
                                 state.batch_stats, stats_change)

    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updated = (optax.apply_updates(state.params, updates), batch_stats, opt_state)
    # A select per leaf, which fuses into the update's elementwise work on GPU and TPU (a
    # lax.cond is a separate region there; XLA:GPU reads its predicate back to the host).
    params, batch_stats, opt_state = jax.tree.map(
        lambda new, old: jnp.where(ok, new, old), updated,
        (state.params, state.batch_stats, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "skipped": (~ok).astype(jnp.float32)}
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in terms.items()})
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, parallel.data_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def compile_step(train_step, state: TrainState, batch: Mapping[str, jax.Array]):
  """`make_train_step`'s step compiled for these arguments' shapes and shardings. On CPU, the
  memory the compiler freed is then returned to the kernel, so that it does not add to every
  step's peak host memory (elsewhere the step's buffers live on the device)."""
  compiled = train_step.lower(state, batch).compile()
  if jax.default_backend() == "cpu":
    host_memory.release_freed_memory()
  return compiled
