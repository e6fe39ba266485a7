"""Data parallelism: 8 CPU devices equal 1 device, and 2 processes x 4 devices equal 1 x 8.

Each case runs in a subprocess (XLA_FLAGS must be set before JAX starts). Run as a script,
`python tests/test_multidevice.py MODE OUT [PROCESS_ID PORT]` trains one step of the tiny
sync-BN model on one global batch of 8 and writes the loss, params and BN statistics to OUT
(and the all-gathers of each mesh's compiled step).
"""
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree.addressable_data(0))}


def worker(mode: str, out: str, process_id: int = 0, port: int = 0) -> None:
  """One train step on every mesh of `mode`; writes {mesh name}/{loss, params/..., stats/...}."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  if mode == "multi":
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  import test_training  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg = test_training.tiny_config(norm="sync_bn")
  cfg.batch_size = 8
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  meshes = {"all": parallel.make_mesh()}
  if mode == "single":
    meshes["one"] = parallel.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  local = next(test_training.synthetic_batches(cfg, process_index=jax.process_index(),
                                               process_count=jax.process_count()))
  results = {}
  for name, mesh in meshes.items():
    init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                             parallel.replicated(mesh))
    train_step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx, schedule,
                                          mesh, jax.random.key(1))
    state, batch = init(jax.random.key(0)), parallel.global_batch(local, mesh)
    compiled = train_step.lower(state, batch).compile()
    results[f"{name}/all_gathers"] = np.array(
        re.findall(r"= (.+?) all-gather(?:-start)?\(", compiled.as_text()), str)
    state, metrics = compiled(state, batch)
    results[f"{name}/loss"] = np.asarray(metrics["loss"].addressable_data(0))
    results.update({f"{name}/params{k}": v for k, v in _flat(state.params).items()})
    results.update({f"{name}/stats{k}": v for k, v in _flat(state.batch_stats).items()})
    results[f"{name}/devices"] = np.int32(mesh.devices.size)
  if jax.process_index() == 0:
    np.savez(out, **results)


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("single") / "single.npz")
  proc = subprocess.run([sys.executable, __file__, "single", out], env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return dict(np.load(out))


def _compare(results, a, b, rtol, atol):
  """Loss, params and BN statistics of run `a` vs run `b`.

  Parameter atol is 2% of one Adam step (lr 1e-3): Adam divides each gradient element by its own
  magnitude plus eps, so an element whose gradient cancels to ~1e-4 of the typical one (seen:
  6e-7 against a median of 1e-2) turns float rounding into ~1% of lr. Attention key biases are
  left out: softmax ignores a shift shared by all keys, so their true gradient is zero and they
  move only by rounding noise, which Adam scales up to a sizeable fraction of lr.
  """
  names = sorted(k[len(a):] for k in results if k.startswith(a)
                 and not k.endswith(("devices", "all_gathers", "/key/bias")))
  assert any("stats" in n for n in names) and any("params" in n for n in names)
  for n in names:
    np.testing.assert_allclose(results[a + n], results[b + n], rtol=rtol, atol=atol, err_msg=n)


def test_eight_devices_equal_one(single):
  assert int(single["all/devices"]) == 8 and int(single["one/devices"]) == 1
  assert np.isfinite(single["all/loss"])
  _compare(single, "all/", "one/", rtol=1e-4, atol=2e-5)


def test_data_parallel_step_gathers_nothing(single):
  """Each device works on its own images: the 8-device step all-gathers nothing (it once gathered
  every image's deformable-attention values, and the class loss its matched indices, to every
  device); only gradients, BN statistics and loss sums are all-reduced."""
  assert single["all/all_gathers"].size == 0, single["all/all_gathers"]


def test_two_processes_of_four_equal_one_of_eight(single, tmp_path):
  out, port = str(tmp_path / "multi.npz"), _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, "multi", out, str(i), str(port)],
                            env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  multi = dict(np.load(out))
  assert int(multi["all/devices"]) == 8
  both = {**{f"multi/{k}": v for k, v in multi.items()}, **{f"single/{k}": v for k, v in single.items()}}
  _compare(both, "multi/all/", "single/all/", rtol=1e-4, atol=2e-5)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  worker(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
