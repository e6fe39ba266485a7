"""Evaluation on several processes: 2 processes x 4 CPU devices give exactly the numbers of 1 x 8
and 1 x 1 (panoptic, instance, semantic), and training with in-loop evaluation runs on 2 processes.

Run as a script (`python tests/test_multihost_eval.py MODE ROOT [PROCESS_ID PORT]`), it evaluates
ROOT/vars on the synthetic validation set in ROOT/tfds and writes ROOT/MODE.json; mode 'multi'
then trains in ROOT/train with evaluation every 2 steps, and process 1 alone gets a SIGTERM during
step 3: the processes agree on it at step 4 (stop_check_every=2) and both stop there.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(root: str):
  """The tiny model of test_training on an 11-image synthetic validation set (uneven shards)."""
  import test_training  # pylint: disable=g-import-not-at-top
  cfg = test_training.tiny_config()
  cfg.model.num_classes = 8
  cfg.data.data_dir = os.path.join(root, "tfds")
  cfg.data.synthetic.update(train_size=2, validation_size=11, image_size=64)
  cfg.data.min_size_test = cfg.data.max_size_test = 64
  cfg.data.eval_pad_size = (64, 64)
  # Random weights: low thresholds so that every task has predictions to count.
  cfg.eval.object_mask_threshold = 0.0
  cfg.eval.overlap_threshold = 0.0
  cfg.eval.batch_size = jax.device_count()  # one image per device on every mesh
  return cfg


def evaluate(root: str) -> dict:
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import loop  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(root)
  mesh, model = parallel.make_mesh(), build_model(cfg)
  variables = loop.load_variables(cfg, model, os.path.join(root, "vars"), mesh)
  batches = data.eval_iterator(cfg, process_index=jax.process_index(),
                               process_count=jax.process_count())
  return loop.evaluate(cfg, model, variables, batches, data.get_dataset_info(cfg.data), mesh,
                       progress=False)


def worker(mode: str, root: str, process_id: int = 0, port: int = 0) -> None:
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  if mode == "multi":
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    # Gloo gives a set of devices 30 s to join its first collective; on a loaded test machine
    # one process can be further behind, so both meet at a coordination-service barrier first.
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier("tests_start", 600_000)
    multihost_utils.sync_global_devices("gloo context for all devices")
  summary = evaluate(root)
  summary.pop("seconds")
  if jax.process_index() == 0:
    with open(os.path.join(root, f"{mode}.json"), "w") as f:
      json.dump(summary, f)
  if mode == "multi":
    import test_training  # pylint: disable=g-import-not-at-top
    from m2f_jax.training import loop  # pylint: disable=g-import-not-at-top
    cfg = tiny_config(root)
    cfg.batch_size = 8
    cfg.total_steps, cfg.eval_every, cfg.checkpoint_every, cfg.stop_check_every = 6, 2, 6, 2

    def batches(cfg, start_step, process_index, process_count):
      for i, batch in enumerate(test_training.synthetic_batches(cfg, start_step, process_index,
                                                                process_count)):
        if process_index == 1 and start_step + i == 2:  # the batch of step 3
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    _, finished = loop.train(cfg, os.path.join(root, "train"), make_iterator=batches)
    assert not finished


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=f"{ROOT}:{os.path.join(ROOT, 'tests')}", JAX_PLATFORMS="cpu",
              TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Random variables and the data set prepared once; then 1 x 8 and 2 x 4 run side by side."""
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("multihost"))
  cfg = tiny_config(root)
  data.get_builder(cfg.data)
  variables = state_lib.init_variables(build_model(cfg), jax.random.key(3), (64, 64))
  variables_io.save_variables(os.path.join(root, "vars"), variables, cfg)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, "single", root], env=_env(8), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  procs += [subprocess.Popen([sys.executable, __file__, "multi", root, str(i), str(port)],
                             env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=1500)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n=====\n".join(log[-3000:] for log in logs)
  results = {}
  for mode in ("single", "multi"):
    with open(os.path.join(root, f"{mode}.json")) as f:
      results[mode] = json.load(f)
  return dict(root=root, logs=logs, **results)


def test_two_processes_equal_one_of_eight_and_one_device(runs):
  one = evaluate(runs["root"])  # this process: one CPU device, batches of 1
  one.pop("seconds")
  assert jax.device_count() == 1 and one["num_images"] == 11
  for task, name in (("panoptic", "PQ"), ("semantic", "mIoU")):
    assert one[task][name] > 0, (task, one[task])
  assert np.isfinite(one["instance"]["AP"]), one["instance"]  # COCOeval ran (this model's AP may be 0)
  # Everything, per class included, bit for bit (NaN of empty classes compare equal as text).
  assert json.dumps(runs["multi"]) == json.dumps(runs["single"]) == json.dumps(one)


def test_training_with_evaluation_and_sigterm_on_two_processes(runs):
  """Evaluation at step 2 on both processes (process 0 writes); a SIGTERM that only process 1 got
  during step 3 stops both at step 4, the next agreement step, with a checkpoint there."""
  train = os.path.join(runs["root"], "train")
  with open(os.path.join(train, "eval_history.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [line["step"] for line in lines] == [2] and lines[0]["panoptic/PQ"] >= 0
  with open(os.path.join(train, "best", "metric.json")) as f:
    assert json.load(f) == {"step": 2, "metric": "panoptic/PQ", "value": lines[0]["panoptic/PQ"]}
  assert "eval at step 2" in runs["logs"][1] and "eval at step 2" not in runs["logs"][2]
  assert "SIGTERM: saved a checkpoint at step 4 and stopped" in runs["logs"][1]
  steps = sorted(int(s) for s in os.listdir(os.path.join(train, "checkpoints")) if s.isdigit())
  assert steps == [2, 4], steps


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  worker(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
