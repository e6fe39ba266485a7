"""Guards of a training workdir: one run at a time (a lock file) and no silent config changes.

A run that cannot proceed leaves the workdir as it found it: `check_resume_config` compares the
new config with the workdir's config.json before anything is written, and the lock file is
removed again when the run ends, however it ends.

What may change on resume (`RESUMABLE_KEYS`): how long and how often (total_steps, log_every,
checkpoint_every, keep_checkpoints, eval_every, stop_check_every), where the data lie and how fast
they are read (data.data_dir, data.manual_dir, data.num_parallel_calls, data.prefetch), everything
under eval.* (evaluation does not touch the train state), init_from / model.backbone.init_from
(ignored once a checkpoint exists), and the memory levers model.remat (the same numbers) and
grad_accum_steps (the same update up to float rounding with frozen BN and no drop path; with sync
BN the statistics, with drop path its draws come per micro-batch: see training/step.py), so that
a run may resume on fewer or smaller devices.
Every other key (model, loss, optimizer, augmentation, batch size, seed, ...) shapes the trained
state or the data order, so a different value is refused. Keys present on only one side (a key
that a newer version of the code added or removed) are not differences.
"""
import contextlib
import json
import logging
import os
import socket
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"

RESUMABLE_KEYS = frozenset((
    "total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "init_from",
    "model.backbone.init_from", "eval_every", "stop_check_every",
    "data.data_dir", "data.manual_dir", "data.num_parallel_calls", "data.prefetch",
    "model.remat", "grad_accum_steps",
))
RESUMABLE_PREFIXES = ("eval.",)


class WorkdirError(RuntimeError):
  """A workdir that a run must not use as asked; the message names the fix (train.py prints it)."""


def check_workdir_path(workdir: str) -> None:
  """Raises WorkdirError when `workdir` (or a parent of it) is an existing non-directory."""
  path = os.path.abspath(workdir)
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir}: {path} is a file, not a directory; give a "
                             "directory (it is created if missing)")


# ---------------------------------------------------------------- config check
def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _resumable(key: str) -> bool:
  return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


def config_differences(stored: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """Keys (dotted) whose value in `cfg` differs from the `stored` config dict, resumable or not."""
  old, new = _flatten(stored), _flatten(json.loads(cfg.to_json_best_effort()))
  return sorted(k for k in set(old) & set(new) if old[k] != new[k])


def read_stored_config(workdir: str) -> Optional[dict]:
  """WORKDIR/config.json as a dict, None when there is none; a WorkdirError names a damaged one."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); restore it from a copy, or move it away "
                       "to resume with the config given now") from None


def check_resume_config(cfg: ml_collections.ConfigDict, workdir: str, has_checkpoint: bool) -> None:
  """Refuses to resume checkpoints of `workdir` with a config that differs in a non-resumable key.

  Raises:
    WorkdirError: one line listing every differing key with both values, and the ways out.
  """
  stored = read_stored_config(workdir)
  if stored is None:
    return
  changed = config_differences(stored, cfg)
  if not changed:
    return
  flat_old, flat_new = _flatten(stored), _flatten(json.loads(cfg.to_json_best_effort()))
  refused = [k for k in changed if not _resumable(k)]
  if refused and has_checkpoint:
    listed = "; ".join(f"{k}: {flat_old[k]!r} -> {flat_new[k]!r}" for k in refused)
    raise WorkdirError(
        f"the config differs from the one the checkpoints in {workdir} were trained with "
        f"({os.path.join(workdir, CONFIG_FILE)}) in {listed}; resume with the stored values, "
        "or start a new --workdir (with --config.init_from to start from these weights)")
  logging.warning("%s: config changed on %s (%s)", workdir, "resume" if has_checkpoint else
                  "restart without checkpoints", ", ".join(changed))


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json (through a temporary file, so a crash leaves the old one)."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(cfg.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- lock
def _process_start_ticks(pid: int) -> Optional[int]:
  """Start time of process `pid` in clock ticks since boot (Linux), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _is_alive(pid: int, start_ticks: Optional[int]) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  if start_ticks is not None:  # a reused pid belongs to a process started later
    now = _process_start_ticks(pid)
    return now is None or now == start_ticks
  return True


class WorkdirLock:
  """WORKDIR/train.lock holding {'host', 'pid', 'start_ticks', 'since'} while a run trains there.

  A lock left by a dead process of this host is taken over with a warning; a live holder, or a
  holder on another host (whose liveness cannot be checked here), is refused with a WorkdirError
  naming it. Use as a context manager, or acquire() / release().
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._mine = dict(host=socket.gethostname(), pid=os.getpid(),
                      start_ticks=_process_start_ticks(os.getpid()))
    self._held = False

  def _read_holder(self) -> Optional[dict]:
    """The holder in the lock file; None when the file vanished. Retries a file being written."""
    for attempt in range(3):
      try:
        with open(self.path) as f:
          text = f.read()
      except FileNotFoundError:
        return None
      try:
        holder = json.loads(text)
        if isinstance(holder, dict) and {"host", "pid"} <= set(holder):
          return holder
      except json.JSONDecodeError:
        pass
      if attempt < 2:
        time.sleep(0.2)
    raise WorkdirError(f"lock file {self.path} is unreadable ({text[:60]!r}); if no run uses "
                       "this workdir, delete that file")

  def _try_create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(dict(self._mine, since=time.strftime("%Y-%m-%d %H:%M:%S")), f)
    return True

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while not self._try_create():
      holder = self._read_holder()
      if holder is None:
        continue  # released in the meantime
      where = f"pid {holder['pid']} on host {holder['host']} (since {holder.get('since', '?')})"
      if holder["host"] != self._mine["host"]:
        raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by {where}; wait for "
                           f"that run or use another --workdir; if it is dead, delete {self.path}")
      if _is_alive(int(holder["pid"]), holder.get("start_ticks")):
        raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by {where}; wait for "
                           "that run to end, stop it, or use another --workdir")
      stale = f"{self.path}.stale.{os.getpid()}"
      try:
        os.rename(self.path, stale)  # only one of several racing takers succeeds
      except FileNotFoundError:
        continue
      os.remove(stale)
      logging.warning("took over the lock %s of %s, which is no longer running", self.path, where)
    self._held = True
    return self

  def release(self) -> None:
    """Removes the lock file if this process still holds it."""
    if not self._held:
      return
    self._held = False
    try:
      holder = self._read_holder()
    except WorkdirError:
      return
    if holder is not None and holder.get("pid") == self._mine["pid"] and \
        holder.get("host") == self._mine["host"]:
      os.remove(self.path)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def lock_for_run(workdir: str):
  """Holds the workdir's lock for a training run; only process 0 (the chief) takes it.

  Every process learns whether the chief got it, so a refused multi-host run stops everywhere.
  """
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(refused) and error is None:
      error = WorkdirError(f"process 0 could not lock workdir {workdir}; see its error")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
