"""Memory levers: model.remat and config.grad_accum_steps change memory, not numbers.

Run as a script (`python tests/test_memory_levers.py OUT`, under
XLA_FLAGS=--xla_force_host_platform_device_count=4), this file makes one train step of the tiny
model with grad_accum_steps=2 on 4 CPU devices and writes its metrics and gradients to OUT; a test
starts it in a subprocess.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from m2f_jax import parallel
from m2f_jax.models import build_model
from m2f_jax.models import swin
from m2f_jax.models.mask2former import REMAT_STAGES
from m2f_jax.training import state as state_lib
from m2f_jax.training import step as step_lib
from m2f_jax.training import workdir as workdir_lib
from tests.test_training import synthetic_batches
from tests.test_training import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMAT_SETTINGS = ("all",) + REMAT_STAGES
ACCUM_BATCH = 8  # one batch of 8 against two micro-batches of 4


def _leaves(tree) -> list:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_trees_close(actual, expected, rtol: float = 1e-5) -> None:
  """Every leaf within rtol x the largest |value| of `expected` (gradients here reach 1e3)."""
  expected, actual = _leaves(expected), _leaves(actual)
  assert len(actual) == len(expected)
  atol = rtol * max(float(np.max(np.abs(x))) for x in expected)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def _with(cfg: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  cfg = cfg.copy_and_resolve_references()
  for key, value in changes.items():
    section = cfg
    *path, last = key.split(".")
    for name in path:
      section = section[name]
    section[last] = value
  return cfg


# ---------------------------------------------------------------- model.remat
@pytest.fixture(scope="module")
def remat_runs():
  """{setting: (loss, grads, batch_stats)} of one sync-BN forward/backward of the tiny model.

  Remat changes the model only, so the loss is a fixed random projection of its outputs (the
  criterion is covered by the train step tests below).
  """
  cfg = tiny_config(norm="sync_bn")
  images = jnp.asarray(next(synthetic_batches(cfg))["image"])
  variables = jax.jit(build_model(cfg).init)(jax.random.key(0), images)
  shapes = jax.eval_shape(lambda v: build_model(cfg).apply(v, images), variables)
  keys = jax.random.split(jax.random.key(1), 2)
  weights = {name: jax.random.normal(key, shapes[name].shape)
             for key, name in zip(keys, sorted(shapes))}
  runs = {}
  for setting in ("none",) + REMAT_SETTINGS:
    model = build_model(_with(cfg, **{"model.remat": setting}))

    def objective(params, model=model):
      outputs, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     images, train=True, mutable=["batch_stats"])
      loss = sum(jnp.sum(jnp.tanh(outputs[k]) * weights[k]) for k in sorted(outputs))
      return loss, updates["batch_stats"]

    (loss, stats), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        variables["params"])
    runs[setting] = (float(loss), grads, stats)
  return runs


@pytest.mark.parametrize("setting", REMAT_SETTINGS)
def test_remat_gives_the_same_loss_gradients_and_statistics(remat_runs, setting):
  loss, grads, stats = remat_runs[setting]
  ref_loss, ref_grads, ref_stats = remat_runs["none"]
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  _assert_trees_close(grads, ref_grads)
  _assert_trees_close(stats, ref_stats)


def test_remat_keeps_parameter_names_and_shapes():
  swin_cfg = tiny_config()
  swin_cfg.model.backbone = ml_collections.ConfigDict(dict(
      name="swin", embed_dim=8, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2,
      patch_size=4, mlp_ratio=2.0, drop_path_rate=0.2, init_from=None))
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  for cfg in (tiny_config(norm="sync_bn"), swin_cfg):
    trees = {s: jax.eval_shape(build_model(_with(cfg, **{"model.remat": s})).init,
                               jax.random.key(0), images) for s in ("none",) + REMAT_SETTINGS}
    for setting, tree in trees.items():
      assert jax.tree.structure(tree) == jax.tree.structure(trees["none"]), setting
      assert jax.tree.leaves(tree) == jax.tree.leaves(trees["none"]), setting


def test_remat_setting_picks_the_stages():
  def flags(setting):
    model = build_model(_with(tiny_config(), **{"model.remat": setting}))
    return tuple(m.remat for m in (model.backbone, model.pixel_decoder, model.decoder))

  assert flags("none") == (False, False, False)
  assert flags("all") == (True, True, True)
  assert flags("backbone") == (True, False, False)
  assert flags("pixel_decoder") == (False, True, False)
  assert flags("decoder, backbone") == (True, False, True)


def test_swin_remat_repeats_drop_path_draws():
  """Drop path inside a rematerialised Swin block draws the same samples when recomputed."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
  kwargs = dict(depth=2, num_heads=2, window_size=2, mlp_ratio=2.0, drop_path_rates=(0.5, 0.5),
                downsample=False)
  variables = swin.SwinStage(**kwargs).init(jax.random.key(1), x, False)
  results = []
  for remat in (False, True):
    stage = swin.SwinStage(**kwargs, remat=remat)

    def objective(params, stage=stage):
      out, _ = stage.apply({"params": params}, x, True, rngs={"dropout": jax.random.key(2)})
      return jnp.sum(jnp.sin(out))

    results.append(jax.jit(jax.value_and_grad(objective))(variables["params"]))
  (loss, grads), (remat_loss, remat_grads) = results
  assert float(remat_loss) == pytest.approx(float(loss), rel=1e-5)
  _assert_trees_close(remat_grads, grads)


@pytest.mark.parametrize("value", ["some", "backbone,head", "", "backbone,,decoder", "None"])
def test_bad_remat_is_refused(value):
  with pytest.raises(ValueError, match=r"^model\.remat must be 'none', 'all' or a comma"):
    build_model(_with(tiny_config(), **{"model.remat": value}))


# ---------------------------------------------------------------- config.grad_accum_steps
def accumulation_step(cfg, mesh, grad_accum_steps: int):
  """(metrics, gradients, batch_stats) of one train step on batch 0 of `cfg` with SGD at lr 1,
  so that the parameters move by exactly the gradients."""
  model = build_model(cfg)
  tx = optax.sgd(1.0)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                           parallel.replicated(mesh))
  step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx,
                                  lambda count: 1.0, mesh, jax.random.key(1), grad_accum_steps)
  batch = parallel.global_batch(next(synthetic_batches(cfg)), mesh)
  state = init(jax.random.key(0))
  before = jax.device_get(state.params)
  compiled = step.lower(state, batch).compile()
  state, metrics = compiled(state, batch)
  grads = jax.tree.map(np.subtract, before, jax.device_get(state.params))
  return jax.device_get(metrics), grads, jax.device_get(state.batch_stats), compiled.as_text()


@pytest.fixture(scope="module")
def accum_runs():
  """{grad_accum_steps: accumulation_step(...)} on one device, batch 8."""
  cfg = tiny_config()
  cfg.batch_size = ACCUM_BATCH
  mesh = parallel.make_mesh()
  return {k: accumulation_step(cfg, mesh, k) for k in (1, 2)}


def _assert_same_step(run, reference):
  metrics, grads, stats, _ = run
  ref_metrics, ref_grads, ref_stats, _ = reference
  assert set(metrics) == set(ref_metrics) and "loss_mask_1" in metrics
  for name, value in ref_metrics.items():  # loss, every loss term, grad_norm
    assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
  _assert_trees_close(grads, ref_grads)
  jax.tree.map(np.testing.assert_array_equal, stats, ref_stats)  # frozen BN: untouched


def test_two_micro_batches_of_4_equal_one_batch_of_8(accum_runs):
  assert int(accum_runs[1][0]["skipped"]) == 0
  _assert_same_step(accum_runs[2], accum_runs[1])
  assert "while" in accum_runs[2][3] and float(accum_runs[1][0]["grad_norm"]) > 0


def _accumulation_env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def test_micro_batches_on_four_devices_equal_one_batch(accum_runs, tmp_path):
  """Each of the 4 devices takes 1 image of each micro-batch from its own 2: nothing is
  all-gathered, and the step equals one batch of 8 on one device."""
  out = str(tmp_path / "four.npz")
  proc = subprocess.run([sys.executable, __file__, out], env=_accumulation_env(4), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  saved = dict(np.load(out))
  assert int(saved["devices"]) == 4 and saved["all_gathers"].size == 0, saved["all_gathers"]
  metrics = {k[len("metric/"):]: v for k, v in saved.items() if k.startswith("metric/")}
  _, ref_grads, ref_stats, _ = accum_runs[1]
  leaves = [saved[f"grad/{i}"] for i in range(len(jax.tree.leaves(ref_grads)))]
  grads = jax.tree.unflatten(jax.tree.structure(ref_grads), leaves)
  _assert_same_step((metrics, grads, ref_stats, ""), accum_runs[1])


@pytest.mark.parametrize("steps,message", [
    (0, r"config\.grad_accum_steps must be a positive integer, got 0"),
    (1.5, r"config\.grad_accum_steps must be a positive integer, got 1\.5"),
    (3, r"batch_size 8 must be a multiple of grad_accum_steps x device count = 3 x 1"),
])
def test_bad_grad_accum_steps_are_refused(steps, message):
  with pytest.raises(ValueError, match=message):
    step_lib.check_grad_accum_steps(ACCUM_BATCH, steps, 1)


def test_step_refuses_a_batch_that_does_not_split():
  cfg = tiny_config()
  mesh = parallel.make_mesh()
  model = build_model(cfg)
  tx = optax.sgd(1.0)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                           parallel.replicated(mesh))
  step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx,
                                  lambda count: 1.0, mesh, jax.random.key(1), grad_accum_steps=4)
  batch = parallel.global_batch(next(synthetic_batches(cfg)), mesh)  # 2 images
  with pytest.raises(ValueError, match=r"batch_size 2 must be a multiple of grad_accum_steps"):
    step.lower(jax.eval_shape(init, jax.random.key(0)), batch)


def test_levers_may_change_on_resume(tmp_path):
  cfg = tiny_config()
  workdir_lib.write_config(cfg, str(tmp_path))
  changed = _with(cfg, **{"model.remat": "all", "grad_accum_steps": 2})
  assert workdir_lib.config_differences(workdir_lib.read_stored_config(str(tmp_path)),
                                        changed) == ["grad_accum_steps", "model.remat"]
  workdir_lib.check_resume_config(changed, str(tmp_path), has_checkpoint=True)  # no error


def worker(out: str) -> None:
  """One grad_accum_steps=2 step of batch 8 on every device; its metrics, gradients and the
  all-gathers of its compiled program to OUT."""
  cfg = tiny_config()
  cfg.batch_size = ACCUM_BATCH
  mesh = parallel.make_mesh()
  metrics, grads, _, text = accumulation_step(cfg, mesh, 2)
  np.savez(out, devices=np.int32(mesh.devices.size),
           all_gathers=np.array(re.findall(r"= (.+?) all-gather(?:-start)?\(", text), str),
           **{f"grad/{i}": g for i, g in enumerate(jax.tree.leaves(grads))},
           **{f"metric/{k}": np.asarray(v) for k, v in metrics.items()})


if __name__ == "__main__":
  worker(sys.argv[1])
