"""A workdir is never changed by a run that cannot proceed: config check, lock, damaged checkpoints.

No test compiles a train step: refused runs stop before it, and the resumed run is asked for no
more steps than its checkpoint already has.
"""
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from m2f_jax import parallel
from m2f_jax import variables_io
from m2f_jax.evaluation import loop as eval_loop
from m2f_jax.models import build_model
from m2f_jax.training import checkpointing
from m2f_jax.training import loop
from m2f_jax.training import optimizer
from m2f_jax.training import state as state_lib
from m2f_jax.training import workdir as workdir_lib
from tests.test_training import synthetic_batches
from tests.test_training import tiny_config


def snapshot(root) -> dict:
  """{relative path: sha256} of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  mesh = parallel.make_mesh()
  model = build_model(cfg)
  tx, _ = optimizer.build_optimizer(cfg)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                           parallel.replicated(mesh))
  state = init(jax.random.key(0))
  return dict(cfg=cfg, mesh=mesh, model=model, state=state,
              abstract=jax.eval_shape(init, jax.random.key(0)))


def make_workdir(setup, path, steps=(2, 4)) -> str:
  """A workdir as a run of tiny_config() leaves it: config.json and checkpoints of `steps`
  (step s holds the initial parameters plus s, so each step is recognisable)."""
  ckpt = checkpointing.Checkpointer(str(path), keep=5, async_save=False)
  for s in steps:
    state = setup["state"]
    ckpt.save(state.replace(step=state.step + s,
                            params=jax.tree.map(lambda x, s=s: x + s, state.params)))
  ckpt.close()
  workdir_lib.write_config(setup["cfg"], str(path))
  return str(path)


def no_train_steps(cfg, start_step=0, **_):
  raise AssertionError(f"the run should not need batches (asked from step {start_step})")


# ------------------------------------------------------------------ config check
def test_changed_model_config_is_refused_before_anything_is_written(setup, tmp_path):
  workdir = make_workdir(setup, tmp_path / "run")
  before = snapshot(workdir)
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.model.decoder.num_queries = 8
  cfg.optimizer.weight_decay = 0.1
  cfg.total_steps = 10  # resumable: not listed
  with pytest.raises(workdir_lib.WorkdirError) as e:
    loop.train(cfg, workdir, make_iterator=no_train_steps)
  message = str(e.value)
  assert "\n" not in message
  assert "model.decoder.num_queries: 6 -> 8" in message
  assert "optimizer.weight_decay: 0.05 -> 0.1" in message
  assert "total_steps" not in message and "new --workdir" in message
  assert snapshot(workdir) == before  # config.json kept, no lock left behind


def test_resumable_keys_may_change(setup, tmp_path):
  workdir = make_workdir(setup, tmp_path / "run", steps=(2,))
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every = 2, 1, 1
  cfg.data.data_dir = str(tmp_path / "elsewhere")
  cfg.eval.batch_size = 4
  assert set(workdir_lib.config_differences(workdir_lib.read_stored_config(workdir), cfg)) == {
      "total_steps", "checkpoint_every", "data.data_dir", "eval.batch_size"}
  final, finished = loop.train(cfg, workdir, make_iterator=synthetic_batches)  # no step left
  assert finished and int(final.step) == 2
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 2  # written once the run could proceed
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))


def test_changed_config_without_checkpoints_is_a_new_start(setup, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  workdir_lib.write_config(setup["cfg"], workdir)
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.model.decoder.num_queries = 8
  workdir_lib.check_resume_config(cfg, workdir, has_checkpoint=False)  # nothing to disagree with


def test_workdir_that_is_a_file_is_refused(setup, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  for workdir in (path, path / "sub"):
    with pytest.raises(workdir_lib.WorkdirError, match=r"notes.txt is a file, not a directory"):
      loop.train(setup["cfg"], str(workdir), make_iterator=no_train_steps)
  assert path.read_text() == "mine"


# ------------------------------------------------------------------ lock
def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_live_lock_refuses_a_second_run(setup, tmp_path):
  workdir = make_workdir(setup, tmp_path / "run")
  with workdir_lib.WorkdirLock(workdir):  # this process plays the first run
    before = snapshot(workdir)
    with pytest.raises(workdir_lib.WorkdirError) as e:
      loop.train(setup["cfg"], workdir, make_iterator=no_train_steps)
    assert snapshot(workdir) == before
  message = str(e.value)
  assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in message
  assert "\n" not in message
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  lock_path = tmp_path / workdir_lib.LOCK_FILE
  dead = _dead_pid()
  lock_path.write_text(json.dumps(dict(host=socket.gethostname(), pid=dead, since="earlier")))
  with caplog.at_level(logging.WARNING):
    with workdir_lib.WorkdirLock(str(tmp_path)):
      assert json.loads(lock_path.read_text())["pid"] == os.getpid()
  assert f"pid {dead}" in caplog.text and "no longer running" in caplog.text
  assert not lock_path.exists()


def test_lock_of_another_host_or_unreadable_is_refused(tmp_path):
  lock_path = tmp_path / workdir_lib.LOCK_FILE
  lock_path.write_text(json.dumps(dict(host="other-host", pid=1, since="earlier")))
  with pytest.raises(workdir_lib.WorkdirError, match=r"in use by pid 1 on host other-host .*"
                     r"if it is dead, delete .*train.lock"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  lock_path.write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match=r"train.lock is unreadable"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert lock_path.read_text() == ""


# ------------------------------------------------------------------ damaged checkpoints
def _truncate_largest_array_file(step_dir: str) -> None:
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "variables"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)


def _empty_metadata(step_dir: str) -> None:
  open(os.path.join(step_dir, "variables", "_METADATA"), "w").close()


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _empty_metadata])
def test_training_resumes_from_the_newest_intact_step(setup, tmp_path, caplog, damage):
  workdir = make_workdir(setup, tmp_path / "run")
  step4 = os.path.join(workdir, "checkpoints", "4")
  damage(step4)
  damaged = snapshot(step4)
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.total_steps = 2  # resume and stop: no step to compile
  with caplog.at_level(logging.WARNING):
    final, finished = loop.train(cfg, workdir, make_iterator=synthetic_batches)
  assert finished and int(final.step) == 2
  expected = jax.tree.map(lambda x: np.asarray(x) + 2, setup["state"].params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(final.params), expected)
  kept = os.path.join(workdir, checkpointing.DAMAGED_DIR, "4")
  assert snapshot(kept) == damaged  # moved aside untouched, never deleted
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert "checkpoint step 4 is damaged: resuming from step 2" in caplog.text
  assert kept in caplog.text


def test_every_step_damaged_is_one_clear_error_and_nothing_moves(setup, tmp_path):
  workdir = make_workdir(setup, tmp_path / "run")
  for step in ("2", "4"):
    _empty_metadata(os.path.join(workdir, "checkpoints", step))
  before = snapshot(workdir)
  with pytest.raises(variables_io.DamagedCheckpointError,
                     match=r"checkpoints is damaged or incomplete .*"
                           r"steps \[4, 2\] are all damaged"):
    loop.train(setup["cfg"], workdir, make_iterator=no_train_steps)
  assert snapshot(workdir) == before


def test_eval_reads_the_newest_intact_step_and_says_why(setup, tmp_path):
  workdir = make_workdir(setup, tmp_path / "run")
  _empty_metadata(os.path.join(workdir, "checkpoints", "4"))
  before = snapshot(workdir)
  variables, step_dir, why = eval_loop.load_checkpoint(setup["cfg"], setup["model"], workdir,
                                                       setup["mesh"])
  assert step_dir == os.path.join(workdir, "checkpoints", "2")
  assert eval_loop.checkpoint_step(step_dir) == 2
  assert why.startswith(f"{step_dir}, the newest intact step: newer step 4 (checkpoint ")
  assert "damaged or incomplete" in why
  expected = jax.tree.map(lambda x: np.asarray(x) + 2, setup["state"].params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables["params"]), expected)
  assert snapshot(workdir) == before  # evaluation moves nothing
  _, _, why = eval_loop.load_checkpoint(setup["cfg"], setup["model"],
                                        os.path.join(workdir, "checkpoints", "2"), setup["mesh"])
  assert why.endswith("as given")
  with pytest.raises(variables_io.DamagedCheckpointError,
                     match=r"checkpoint .*checkpoints/4/variables is damaged or incomplete "
                           r"\(ValueError: its _METADATA file is missing, empty or unreadable"):
    eval_loop.load_checkpoint(setup["cfg"], setup["model"],
                              os.path.join(workdir, "checkpoints", "4"), setup["mesh"])


_TWO_HOSTS = """
import os, sys
from m2f_jax import parallel
parallel.initialize_distributed(f"127.0.0.1:{sys.argv[1]}", num_processes=2,
                                process_id=int(sys.argv[2]))
from jax.experimental import multihost_utils
from m2f_jax.training import workdir
free, taken = sys.argv[3], sys.argv[4]
with workdir.lock_for_run(free) as lock:
  print("free:", "holds" if lock is not None else "no lock", flush=True)
  multihost_utils.sync_global_devices("both inside")
try:
  with workdir.lock_for_run(taken):
    print("taken: entered")
except workdir.WorkdirError as e:
  print("taken:", e)
"""


def test_only_the_chief_locks_and_a_refusal_stops_every_process(tmp_path):
  free, taken = tmp_path / "free", tmp_path / "taken"
  taken.mkdir()
  (taken / workdir_lib.LOCK_FILE).write_text(json.dumps(dict(host="other-host", pid=1)))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, str(port), str(i), str(free),
                             str(taken)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  chief, other = ([l for l in out.splitlines() if l.startswith(("free:", "taken:"))]
                  for out, _ in outs)  # gloo prints to stdout too
  assert chief[0] == "free: holds" and other[0] == "free: no lock"
  assert not (free / workdir_lib.LOCK_FILE).exists()  # released
  assert chief[1].startswith("taken: workdir ") and "in use by pid 1 on host other-host" in chief[1]
  assert other[1] == f"taken: process 0 could not lock workdir {taken}; see its error"
  assert json.loads((taken / workdir_lib.LOCK_FILE).read_text())["host"] == "other-host"
