"""The training loop: state on the mesh, resume, data, update steps, logging, checkpoints."""
import os
import re
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from m2f_jax import parallel
from m2f_jax.convert import imagenet_backbone
from m2f_jax.training import checkpointing
from m2f_jax.training import init_from
from m2f_jax.training import optimizer
from m2f_jax.training import periodic_eval
from m2f_jax.training import state as state_lib
from m2f_jax.training import step as step_lib
from m2f_jax.training import workdir as workdir_lib

# make_iterator(cfg, start_step, process_index, process_count) -> iterator of local numpy batches
IteratorFn = Callable[..., Iterator[dict]]


def check_run_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad run key."""
  for key in ("total_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
              "stop_check_every"):
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
  if cfg.init_from is not None and not os.path.isdir(cfg.init_from):
    raise FileNotFoundError(f"config.init_from={cfg.init_from!r} is not a directory")
  if cfg.init_from is not None and not _holds_weights(cfg.init_from):
    raise FileNotFoundError(
        f"config.init_from={cfg.init_from!r} holds no model variables: give a directory written by "
        "`python -m m2f_jax.tools.convert` (with a 'variables' folder) or a training workdir (with "
        "'checkpoints/STEP')")


def _holds_weights(path: str) -> bool:
  """Whether `path` has a variables folder, a checkpoints folder or step folders."""
  names = os.listdir(path)
  return ("variables" in names or checkpointing.CHECKPOINT_DIR in names
          or any(n.isdigit() and os.path.isdir(os.path.join(path, n, "variables")) for n in names))


class _StopRequest:
  """Remembers a SIGTERM; every process agrees on stopping at the same step.

  With several processes the flags are all-gathered only every `check_every` steps (the same
  steps on every process), so the hot loop does not wait for a collective on every step.
  """

  def __init__(self, check_every: int = 1):
    self.requested = False
    self.check_every = check_every
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


def sum_over_layers(metrics: dict) -> dict:
  """Per-prediction terms ('loss_ce_0', 'loss_ce_1', ...) summed into one ('loss_ce')."""
  out = {}
  for key, value in metrics.items():
    group = re.sub(r"_\d+$", "", key)
    out[group] = out.get(group, 0.0) + value
  return out


class _Logger:
  """Means of the step metrics over each logging interval to stdout and TensorBoard.

  TensorBoard gets every term; stdout sums the per-prediction loss terms.
  """

  def __init__(self, workdir: str, batch_size: int, enabled: bool):
    self._enabled = enabled
    self._batch_size = batch_size
    self._pending = []
    self._writer = None
    self._tf = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      # What tf.summary.scalar would write; built here as that needs the tensorboard package.
      self._scalar_metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
          data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()
      self._writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self._since = time.perf_counter()

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def flush(self, step: int, skipped_total: int, bar: tqdm.tqdm) -> None:
    if not self._pending:
      return
    history = jax.device_get(self._pending)
    elapsed = time.perf_counter() - self._since
    means = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
    means["images_per_second"] = self._batch_size * len(history) / max(elapsed, 1e-9)
    means["skipped_total"] = float(skipped_total)
    self._pending, self._since = [], time.perf_counter()
    if not self._enabled:
      return
    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}")
    bar.write(f"step {step}: " + ", ".join(
        f"{k}={v:.5g}" for k, v in sorted(sum_over_layers(means).items())))
    with self._writer.as_default(step=step):
      for k, v in means.items():
        self._tf.summary.write(k, self._tf.constant(v, self._tf.float32),
                               metadata=self._scalar_metadata)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _initial_state(cfg, model, tx, mesh, ckpt, init_key) -> state_lib.TrainState:
  """Latest checkpoint of the workdir, else `cfg.init_from` variables, else a fresh init (with
  `cfg.model.backbone.init_from` ImageNet weights in its backbone when set)."""
  replicated = parallel.replicated(mesh)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size), replicated)
  abstract = jax.eval_shape(init, init_key)  # with the shardings
  if ckpt.latest_step() is not None:
    return ckpt.restore(abstract)
  if cfg.init_from is not None:
    target = {"params": abstract.params, "batch_stats": abstract.batch_stats}
    variables, _ = init_from.load_variables(cfg.init_from, target, lambda: init(init_key).variables)
    return state_lib.place_train_state(variables, tx, replicated)
  state = init(init_key)
  if cfg.model.backbone.get("init_from") is not None:  # ImageNet weights into the fresh backbone
    variables = imagenet_backbone.init_model_backbone(cfg.model.backbone, jax.device_get(state.variables))
    state = state_lib.place_train_state(variables, tx, replicated)
  return state


def train(cfg: ml_collections.ConfigDict, workdir: str, *, model: Optional[Any] = None,
          loss_fn: Optional[step_lib.LossFn] = None,
          make_iterator: Optional[IteratorFn] = None) -> tuple[state_lib.TrainState, bool]:
  """Trains until cfg.total_steps, resuming from the latest checkpoint in `workdir`.

  `model`, `loss_fn` and `make_iterator` default to build_model(cfg), the Mask2Former criterion
  and m2f_jax.data.train_iterator.

  Returns:
    (final state, finished): finished is False when a SIGTERM stopped the run early (a
    checkpoint of the stopping step is on disk).
  """
  check_run_config(cfg)
  workdir_lib.check_workdir_path(workdir)
  with workdir_lib.lock_for_run(workdir):
    return _train_in_locked_workdir(cfg, workdir, model=model, loss_fn=loss_fn,
                                    make_iterator=make_iterator)


def _train_in_locked_workdir(cfg, workdir, *, model, loss_fn, make_iterator):
  """`train` once the workdir is locked: nothing is written there before the state is ready."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(cfg.batch_size, mesh)
  step_lib.check_grad_accum_steps(cfg.batch_size, cfg.get("grad_accum_steps", 1),
                                  mesh.devices.size)
  if model is None:
    from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
    model = build_model(cfg)
  if loss_fn is None:
    loss_fn = step_lib.default_loss_fn(cfg, mesh)
  if make_iterator is None:
    from m2f_jax.data import train_iterator as make_iterator  # pylint: disable=g-import-not-at-top
  is_chief = jax.process_index() == 0

  tx, schedule = optimizer.build_optimizer(cfg)
  init_key, step_key = jax.random.split(jax.random.key(cfg.seed))
  ckpt = checkpointing.Checkpointer(workdir, cfg.keep_checkpoints)
  workdir_lib.check_resume_config(cfg, workdir, has_checkpoint=ckpt.latest_step() is not None)
  state = _initial_state(cfg, model, tx, mesh, ckpt, init_key)
  if is_chief:
    workdir_lib.write_config(cfg, workdir)
  step = int(jax.device_get(state.step))
  if is_chief:
    devices, micro = mesh.devices.size, cfg.get("grad_accum_steps", 1)
    accumulation = f", in {micro} micro-batches" if micro > 1 else ""
    print(f"m2f_jax: {state_lib.num_params(state.params):,} parameters; {devices} "
          f"{jax.devices()[0].platform} devices, {jax.process_count()} processes; global batch "
          f"{cfg.batch_size} ({cfg.batch_size // devices} per device{accumulation}); step {step} "
          f"of {cfg.total_steps}; checkpoints every {cfg.checkpoint_every} steps in {ckpt.directory}",
          flush=True)

  train_step = step_lib.make_train_step(model, loss_fn, tx, schedule, mesh, step_key,
                                       grad_accum_steps=cfg.get("grad_accum_steps", 1))
  evaluator = periodic_eval.PeriodicEvaluator(cfg, model, mesh, workdir)
  evaluator.resume(step)
  if evaluator.due(step):  # killed after this step's checkpoint, before its evaluation finished
    evaluator.run(state, step, os.path.join(ckpt.directory, str(step)))
  batches = make_iterator(cfg, start_step=step, process_index=jax.process_index(),
                          process_count=jax.process_count())
  stop = _StopRequest(cfg.stop_check_every)
  logger = _Logger(workdir, cfg.batch_size, enabled=is_chief)
  bar = tqdm.tqdm(initial=step, total=cfg.total_steps, disable=not is_chief, dynamic_ncols=True)
  finished = True
  compiled_step = None
  try:
    while step < cfg.total_steps:
      batch = parallel.global_batch(next(batches), mesh)
      if compiled_step is None:
        compiled_step = step_lib.compile_step(train_step, state, batch)
      state, metrics = compiled_step(state, batch)
      step += 1
      bar.update(1)
      logger.add(metrics)
      if step % cfg.log_every == 0 or step == cfg.total_steps:
        logger.flush(step, int(jax.device_get(state.skipped)), bar)
      stopping = stop.agreed(step)
      evaluating = evaluator.due(step) and not stopping  # a resume evaluates a stopping step
      if stopping or evaluating or step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
        ckpt.save(state)
      if evaluating:
        ckpt.wait()  # best/ copies this checkpoint; a history line implies it is on disk
        evaluator.run(state, step, os.path.join(ckpt.directory, str(step)))
      if stopping:
        finished = step == cfg.total_steps
        if is_chief:
          bar.write(f"SIGTERM: saved a checkpoint at step {step} and stopped")
        break
  finally:
    ckpt.wait()
    ckpt.close()
    bar.close()
    logger.close()
    stop.restore_handler()
  return state, finished
