"""Train-state checkpoints (orbax CheckpointManager) and reading model variables back from them.

Layout of a workdir:
  WORKDIR/checkpoints/STEP/variables/  {'params', 'batch_stats'}: the same format as
                                       `m2f_jax.variables_io`, so a step directory is also a
                                       variables directory
  WORKDIR/checkpoints/STEP/train/      {'opt_state', 'step', 'skipped'}
Writes are atomic (orbax renames a finished temporary directory), so a run killed mid-save leaves
the previous checkpoints intact.
"""
import os
from typing import Any, Optional

import flax
import jax
import orbax.checkpoint as ocp

from m2f_jax import variables_io
from m2f_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"


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
    """The state at `step` (default: latest), placed like `abstract_state`'s ShapeDtypeStructs."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    variables, train = _split(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables), train=ocp.args.StandardRestore(train)))
    opt_state = flax.serialization.from_state_dict(abstract_state.opt_state,
                                                   restored["train"]["opt_state"])
    return TrainState(step=restored["train"]["step"], params=restored["variables"]["params"],
                      batch_stats=restored["variables"]["batch_stats"], opt_state=opt_state,
                      skipped=restored["train"]["skipped"])

  def wait(self) -> None:
    """Blocks until pending writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _step_directory(path: str) -> str:
  """The step directory meant by a workdir, its checkpoints directory or a step directory."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "variables")):
    return path
  for candidate in (os.path.join(path, CHECKPOINT_DIR), path):
    names = os.listdir(candidate) if os.path.isdir(candidate) else []
    steps = [int(n) for n in names
             if n.isdigit() and os.path.isdir(os.path.join(candidate, n, "variables"))]
    if steps:
      return os.path.join(candidate, str(max(steps)))
  raise FileNotFoundError(f"no checkpoint at {path}: expected a train workdir, its "
                          f"'{CHECKPOINT_DIR}' directory or one step directory in it")


def restore_variables(path: str, target: Optional[Any] = None) -> dict:
  """Model variables {'params', 'batch_stats'} of the latest checkpoint under `path`.

  Args:
    path: a train workdir, WORKDIR/checkpoints, or one step directory WORKDIR/checkpoints/STEP.
    target: optional pytree of arrays or jax.ShapeDtypeStruct (with shardings to place the
      result); the stored tree must match it, otherwise a ValueError names the differences.
  """
  return variables_io.load_variables(_step_directory(path), target)


def variables_directory(path: str) -> str:
  """The variables directory (m2f_jax.variables_io layout) that `restore_variables(path)` reads."""
  return _step_directory(path)
