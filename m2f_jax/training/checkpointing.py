"""Train-state checkpoints (orbax CheckpointManager) and reading model variables back from them.

Layout of a workdir:
  WORKDIR/checkpoints/STEP/variables/  {'params', 'batch_stats'}: the same format as
                                       `m2f_jax.variables_io`, so a step directory is also a
                                       variables directory
  WORKDIR/checkpoints/STEP/train/      {'opt_state', 'step', 'skipped'}
Writes are atomic (orbax renames a finished temporary directory), so a run killed mid-save leaves
the previous checkpoints intact. A step whose files were damaged later (a truncated file, an
emptied _METADATA) is skipped with a warning: training resumes from the newest intact step and
moves the damaged one, untouched, to WORKDIR/checkpoints_damaged/STEP; evaluation reads the newest
intact step and says so.
"""
import logging
import os
from typing import Any, Optional

import flax
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from m2f_jax import variables_io
from m2f_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"


def _split(state: TrainState) -> tuple[dict, dict]:
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  train = {"opt_state": flax.serialization.to_state_dict(state.opt_state),
           "step": state.step, "skipped": state.skipped}
  return variables, train


class Checkpointer:
  """Saves and restores the whole TrainState under WORKDIR/checkpoints (async writes).

  Every process of a multi-host job must make the same calls.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("variables", "train"))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, state: TrainState) -> bool:
    """Starts writing `state` at its step; returns once the arrays are copied off the devices."""
    step = int(jax.device_get(state.step))
    variables, train = _split(state)
    return self._manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), train=ocp.args.StandardSave(train)), force=True)

  def restore(self, abstract_state: TrainState, step: Optional[int] = None) -> TrainState:
    """The state at `step` (default: the newest intact step), placed like `abstract_state`'s
    ShapeDtypeStructs.

    Without `step`, damaged newer steps are skipped with a warning and, once an older step was
    read, moved to WORKDIR/checkpoints_damaged/ (kept, never deleted). A checkpoint of another
    shape raises ValueError; no intact step raises variables_io.DamagedCheckpointError.
    """
    if step is not None:
      return self._restore_step(abstract_state, step)
    damaged = []
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore_step(abstract_state, candidate)
      except variables_io.DamagedCheckpointError as e:
        logging.warning("skipping checkpoint step %d: %s", candidate, e)
        damaged.append(candidate)
        continue
      if damaged:
        self._set_aside(damaged, candidate)
      return state
    if damaged:
      raise variables_io.DamagedCheckpointError(
          self.directory, RuntimeError(f"steps {damaged} are all damaged; move them away to start "
                                       "afresh, or restore them from a copy"))
    raise FileNotFoundError(f"no checkpoint in {self.directory}")

  def _restore_step(self, abstract_state: TrainState, step: int) -> TrainState:
    variables, train = _split(abstract_state)
    step_dir = os.path.join(self.directory, str(step))
    variables_io.check_fits(os.path.join(step_dir, "variables"), variables)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(variables), train=ocp.args.StandardRestore(train)))
    except Exception as e:  # pylint: disable=broad-except  # tensorstore raises plain Exception
      raise variables_io.DamagedCheckpointError(step_dir, e) from e
    opt_state = flax.serialization.from_state_dict(abstract_state.opt_state,
                                                   restored["train"]["opt_state"])
    return TrainState(step=restored["train"]["step"], params=restored["variables"]["params"],
                      batch_stats=restored["variables"]["batch_stats"], opt_state=opt_state,
                      skipped=restored["train"]["skipped"])

  def _set_aside(self, damaged: list, resumed: int) -> None:
    """Moves damaged step directories out of the manager's sight (process 0 moves, all wait)."""
    aside = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in damaged:
        target = os.path.join(aside, str(step))
        while os.path.exists(target):
          target += "_"
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("checkpoint step %d is damaged: resuming from step %d; the damaged step "
                        "is kept at %s", step, resumed, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("m2f_jax: damaged checkpoints set aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _step_directories(path: str) -> list[str]:
  """The step directories meant by a workdir, its checkpoints directory or a step directory,
  newest first."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "variables")):
    return [path]
  for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
    names = os.listdir(candidate) if os.path.isdir(candidate) else []
    steps = [int(n) for n in names
             if n.isdigit() and os.path.isdir(os.path.join(candidate, n, "variables"))]
    if steps:
      return [os.path.join(candidate, str(s)) for s in sorted(steps, reverse=True)]
  raise FileNotFoundError(f"no checkpoint at {path}: expected a train workdir, its "
                          f"'{CHECKPOINT_DIR}' directory or one step directory in it")


def restore_newest_variables(path: str, target: Optional[Any] = None) -> tuple[dict, str, str]:
  """Model variables of the newest intact checkpoint under `path`, the step directory read and a
  sentence saying which step that is and why.

  Args:
    path: a train workdir, WORKDIR/checkpoints, or one step directory WORKDIR/checkpoints/STEP.
    target: optional pytree of arrays or jax.ShapeDtypeStruct (with shardings to place the
      result); the stored tree must match it, otherwise a ValueError names the differences.
  """
  candidates = _step_directories(path)
  damaged = []
  for step_dir in candidates:
    try:
      variables = variables_io.load_variables(step_dir, target)
    except variables_io.DamagedCheckpointError as e:
      if len(candidates) == 1:
        raise
      logging.warning("skipping %s", e)
      damaged.append(f"step {os.path.basename(step_dir)} ({e})")
      continue
    if len(candidates) == 1:
      why = f"{step_dir} as given"
    elif damaged:
      why = f"{step_dir}, the newest intact step: newer " + "; ".join(damaged)
    else:
      why = f"{step_dir}, the latest checkpoint under {os.path.abspath(path)}"
    return variables, step_dir, why
  raise variables_io.DamagedCheckpointError(
      os.path.abspath(path), RuntimeError("every step is damaged: " + "; ".join(damaged)))


def restore_variables(path: str, target: Optional[Any] = None) -> dict:
  """Model variables {'params', 'batch_stats'} of the newest intact checkpoint under `path`
  (see restore_newest_variables)."""
  return restore_newest_variables(path, target)[0]


def variables_directory(path: str) -> str:
  """The newest step directory under `path` (a workdir, its checkpoints directory or one step
  directory), in the m2f_jax.variables_io layout."""
  return _step_directories(path)[0]
