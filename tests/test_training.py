"""Train step, checkpoints and the training loop (SIGKILL resume, SIGTERM) on a tiny Mask2Former.

Run as a script (`python tests/test_training.py WORKDIR CHECKPOINT_EVERY SECONDS_PER_BATCH`), this
file trains the same tiny model with `m2f_jax.training.loop.train`; the tests start it in
subprocesses.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import synthetic
from m2f_jax import parallel
from m2f_jax import variables_io
from m2f_jax.models import build_model
from m2f_jax.training import checkpointing
from m2f_jax.training import loop
from m2f_jax.training import optimizer
from m2f_jax.training import state as state_lib
from m2f_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """configs/synthetic.py shrunk for fast compiles: 64x64 images, 1 decoder layer."""
  cfg = synthetic.get_config()
  cfg.model.backbone.norm = norm
  cfg.model.num_classes = 3
  cfg.model.pixel_decoder.update(conv_dim=32, mask_dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                                 num_groups=4)
  cfg.model.decoder.update(num_queries=6, hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=1)
  cfg.loss.num_points = 64
  cfg.data.image_size = (64, 64)
  cfg.data.max_targets = 4
  cfg.batch_size = 2
  cfg.total_steps = 6
  cfg.log_every = 1
  cfg.checkpoint_every = 2
  cfg.eval_every = 0          # its 3 classes are not the synthetic set's 8
  cfg.optimizer.backbone_multiplier = 0.1
  return cfg


def synthetic_batches(cfg, start_step=0, process_index=0, process_count=1):
  """Endless deterministic batches; example i of step s depends only on (seed, s, i)."""
  local = cfg.batch_size // process_count
  h, w = cfg.data.image_size
  m = cfg.data.max_targets
  step = start_step
  while True:
    batch = {"image": [], "valid_hw": [], "labels": [], "segment_ids": []}
    for i in range(process_index * local, (process_index + 1) * local):
      rng = np.random.default_rng([cfg.seed, step, i])
      labels = np.full((m,), -1, np.int32)
      segments = np.zeros((1, h, w), np.int32)
      for t in range(int(rng.integers(1, m + 1))):
        labels[t] = rng.integers(0, cfg.model.num_classes)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        segments[0, y:y + h // 2, x:x + w // 2] = t + 1
      batch["image"].append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      batch["valid_hw"].append(np.int32([h, w - 8 * (i % 2)]))
      batch["labels"].append(labels)
      batch["segment_ids"].append(segments)
    yield {k: np.stack(v) for k, v in batch.items()}
    step += 1


def nan_when_flagged(loss_fn):
  """The real loss, made NaN for batches whose first valid_hw is (0, 0).

  The script mode trains with it too, so its compiled step is the tests' (compilation cache).
  """

  def wrapped(outputs, batch, rng):
    total, terms = loss_fn(outputs, batch, rng)
    return total + jnp.where(batch["valid_hw"][0, 0] == 0, jnp.nan, 0.0), terms

  return wrapped


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  mesh = parallel.make_mesh()
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                           parallel.replicated(mesh))
  step_key = jax.random.split(jax.random.key(cfg.seed))[1]  # as loop.train draws it
  train_step = step_lib.make_train_step(
      model, nan_when_flagged(step_lib.default_loss_fn(cfg, mesh)), tx, schedule, mesh, step_key)
  batch = next(synthetic_batches(cfg))
  return dict(cfg=cfg, mesh=mesh, init=init, step=train_step, batch=batch, tx=tx)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _run(setup, batch, state=None):
  state = setup["init"](jax.random.key(0)) if state is None else state
  return setup["step"](state, parallel.global_batch(batch, setup["mesh"]))


def test_step_updates_deterministically_and_keeps_frozen_bn(setup):
  before = _host(setup["init"](jax.random.key(0)))
  first, metrics = _run(setup, setup["batch"])
  second, metrics2 = _run(setup, setup["batch"])
  first, second = _host(first), _host(second)
  assert float(metrics["loss"]) == float(metrics2["loss"]) and np.isfinite(float(metrics["loss"]))
  assert int(first.step) == 1 and int(first.skipped) == 0 and float(metrics["skipped"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), first.params,
                                         before.params))
  labels = jax.tree.leaves(optimizer.param_labels(before.params, setup["cfg"]))
  assert all(c == (lab != optimizer.FROZEN) for c, lab in zip(changed, labels))
  assert optimizer.FROZEN in labels
  jax.tree.map(np.testing.assert_array_equal, first.batch_stats, before.batch_stats)
  assert {"loss_ce_0", "loss_mask_1", "loss_dice_1", "grad_norm", "learning_rate"} <= set(metrics)
  assert float(metrics["learning_rate"]) == pytest.approx(setup["cfg"].optimizer.learning_rate)


def test_nan_batch_is_skipped_and_counted(setup):
  state, _ = _run(setup, setup["batch"])
  before = _host(state)
  poisoned = dict(setup["batch"], valid_hw=np.zeros_like(setup["batch"]["valid_hw"]))
  state, metrics = _run(setup, poisoned, state)
  after = _host(state)
  assert not np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 1.0
  assert int(after.step) == 2 and int(after.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  state, metrics = _run(setup, setup["batch"], state)  # training goes on
  assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1 and int(state.step) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_host(state.params)))


def test_batch_without_targets_trains(setup):
  empty = dict(setup["batch"], labels=np.full_like(setup["batch"]["labels"], -1),
               segment_ids=np.zeros_like(setup["batch"]["segment_ids"]))
  before = _host(setup["init"](jax.random.key(0)))
  state, metrics = _run(setup, empty)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0.0
  assert float(metrics["loss_mask_0"]) == 0.0 and float(metrics["loss_ce_0"]) > 0.0
  decoder = _host(state.params)["decoder"]["head"]["class_embed"]["kernel"]
  assert not np.array_equal(decoder, before.params["decoder"]["head"]["class_embed"]["kernel"])


def test_checkpoint_roundtrip_and_restore_variables(setup, tmp_path):
  state, _ = _run(setup, setup["batch"])
  expected = _host(state)
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(state)
  ckpt.wait()
  assert ckpt.latest_step() == 1
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(setup["mesh"])),
      state)
  restored = ckpt.restore(abstract)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _host(restored), expected)
  for path in (str(tmp_path), os.path.join(str(tmp_path), "checkpoints", "1")):
    variables = checkpointing.restore_variables(path, {"params": abstract.params,
                                                       "batch_stats": abstract.batch_stats})
    jax.tree.map(np.testing.assert_array_equal, _host(variables["params"]), expected.params)
  wrong = {"params": {"decoder": abstract.params["decoder"]}, "batch_stats": abstract.batch_stats}
  with pytest.raises(ValueError, match="missing in checkpoint|unexpected in checkpoint"):
    checkpointing.restore_variables(str(tmp_path), wrong)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointing.restore_variables(str(tmp_path / "nothing"))


def test_init_from_starts_the_loop_from_those_variables(setup, tmp_path):
  start = setup["init"](jax.random.key(5))  # not the loop's own initialisation
  variables_io.save_variables(str(tmp_path / "vars"), _host(start.variables))
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.init_from = str(tmp_path / "vars")
  loss_fn = nan_when_flagged(step_lib.default_loss_fn(cfg, setup["mesh"]))
  final, finished = loop.train(cfg, str(tmp_path / "run"), make_iterator=synthetic_batches,
                               loss_fn=loss_fn)
  assert finished and int(final.step) == cfg.total_steps
  batches = synthetic_batches(cfg)
  expected = start
  for _ in range(cfg.total_steps):
    expected, _ = setup["step"](expected, parallel.global_batch(next(batches), setup["mesh"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               _host(final.params), _host(expected.params))
  assert (tmp_path / "run" / "config.json").exists()


def test_bad_run_config_is_named(setup):
  cfg = setup["cfg"].copy_and_resolve_references()
  cfg.total_steps = 0
  with pytest.raises(ValueError, match="config.total_steps"):
    loop.check_run_config(cfg)
  with pytest.raises(ValueError, match="multiple of the device count"):
    parallel.check_batch_size(3, parallel.Mesh(np.asarray(jax.devices() * 2), ("data",)))


# ------------------------------------------------------------------ the loop in subprocesses


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _start(workdir, checkpoint_every, seconds_per_batch=0.0):
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(workdir),
                           str(checkpoint_every), str(seconds_per_batch)], env=_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {path}")
    time.sleep(0.05)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
  straight = _start(tmp_path / "straight", 2)
  code, out = _finish(straight)
  assert code == 0, out
  killed = _start(tmp_path / "killed", 2)
  _wait_for(tmp_path / "killed" / "checkpoints" / "2", killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  steps = sorted(int(s) for s in os.listdir(tmp_path / "killed" / "checkpoints") if s.isdigit())
  assert steps and steps[-1] < 6, steps
  code, out = _finish(_start(tmp_path / "killed", 2))
  assert code == 0, out
  assert f"step {steps[-1]} of 6;" in out
  a = checkpointing.restore_variables(str(tmp_path / "straight"))
  b = checkpointing.restore_variables(str(tmp_path / "killed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  proc = _start(tmp_path, 100, seconds_per_batch=1.0)
  seen = []
  while not any(line.startswith("step 1:") for line in seen):  # the first logged step
    seen.append(proc.stdout.readline())
    assert seen[-1] or proc.poll() is None, "".join(seen)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc)
  out = "".join(seen) + out
  assert code == 143, out
  assert "SIGTERM: saved a checkpoint at step" in out
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 6


def main(workdir: str, checkpoint_every: int, seconds_per_batch: float) -> int:
  """Trains tiny_config() for its 6 steps; a slow input (seconds_per_batch) leaves time for signals."""
  cfg = tiny_config()
  cfg.checkpoint_every = checkpoint_every

  def batches(*args, **kwargs):
    for batch in synthetic_batches(*args, **kwargs):
      time.sleep(seconds_per_batch)
      yield batch

  loss_fn = nan_when_flagged(step_lib.default_loss_fn(cfg, parallel.make_mesh()))
  _, finished = loop.train(cfg, workdir, loss_fn=loss_fn, make_iterator=batches)
  return 0 if finished else 143


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
