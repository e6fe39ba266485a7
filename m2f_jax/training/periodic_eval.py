"""Evaluation during training: every `cfg.eval_every` steps, the history and the best state.

Files in the workdir (written by process 0 only; every process evaluates its shard):
  eval_history.jsonl   one line per evaluation: {"step": N, "<task>/<metric>": value, ...}
  tensorboard/eval/    the same scalars for TensorBoard
  best/                the variables of the best evaluation by `cfg.eval.best_metric` (a variables
                       directory: variables/ + config.json, read by eval.py --checkpoint, init_from
                       and predict) and best/metric.json {"step", "metric", "value"}

Order at an evaluation step N: the checkpoint of N is written and waited for, then the evaluation
runs, then best/ is replaced (tmp dir + rename), then the history line is appended. A run killed
anywhere in between resumes from a checkpoint at or after N; if the line for the resume step is
missing, it evaluates that step first, so no line is lost or written twice.
"""
import json
import math
import os
import shutil
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from m2f_jax.evaluation import evaluator as evaluator_lib
from m2f_jax.evaluation import loop as eval_loop

HISTORY_FILE = "eval_history.jsonl"
BEST_DIR = "best"
_HEADLINE = {"panoptic": "panoptic/PQ", "instance": "instance/AP", "semantic": "semantic/mIoU"}

# make_batches(cfg, process_index, process_count) -> this process's evaluation batches
BatchesFn = Callable[..., Iterable[dict]]


def default_best_metric(cfg: ml_collections.ConfigDict, dataset_kind: str) -> str:
  """The headline metric of the first evaluated task, e.g. 'panoptic/PQ'."""
  tasks = evaluator_lib.tasks_of_kind(tuple(cfg.eval.tasks), dataset_kind)
  if not tasks:
    raise ValueError(f"the data set {cfg.data.name!r} supports none of "
                     f"eval.tasks={tuple(cfg.eval.tasks)}")
  return _HEADLINE[tasks[0]]


def read_history(path: str) -> list[dict]:
  """The complete lines of an eval_history.jsonl (a torn last line is left out)."""
  if not os.path.exists(path):
    return []
  lines = []
  with open(path) as f:
    for line in f:
      try:
        lines.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return lines


class PeriodicEvaluator:
  """Evaluates the training state every `cfg.eval_every` steps (0: never) with one compiled forward.

  Every process of the job makes the same calls; only process 0 touches the files.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, model: Any, mesh, workdir: str,
               make_batches: Optional[BatchesFn] = None):
    self.every = cfg.get("eval_every", 0)
    if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
      raise ValueError(f"config.eval_every must be a non-negative integer (0 = off), got "
                       f"{self.every!r}")
    self.cfg, self.model, self.mesh = cfg, model, mesh
    self.is_chief = jax.process_index() == 0
    self.history_path = os.path.join(workdir, HISTORY_FILE)
    self.best_dir = os.path.join(workdir, BEST_DIR)
    self.config_path = os.path.join(workdir, "config.json")
    self.logdir = os.path.join(workdir, "tensorboard", "eval")
    self._done: set = set()
    self._best_value = -math.inf
    if not self.every:
      return
    from m2f_jax import data  # pylint: disable=g-import-not-at-top
    self._make_batches = make_batches or data.eval_iterator
    self.dataset_info = data.get_dataset_info(cfg.data)
    if self.dataset_info.num_classes != cfg.model.num_classes:
      raise ValueError(f"config.model.num_classes={cfg.model.num_classes} but the evaluation data "
                       f"{cfg.data.name!r} has {self.dataset_info.num_classes} classes; fix one, or "
                       "set config.eval_every=0")
    self.metric = cfg.eval.get("best_metric", None) or default_best_metric(
        cfg, self.dataset_info.kind)
    self._predict = eval_loop.make_predict_fn(model, mesh)  # compiled once, reused every time

  @property
  def enabled(self) -> bool:
    return self.every > 0

  def resume(self, step: int) -> None:
    """Reads the history and best/ of a workdir that restarts at `step`.

    Lines after `step` (from a run whose later checkpoints are gone) and a torn last line are
    dropped; an interrupted replacement of best/ is finished or undone.
    """
    if not self.enabled:
      return
    history = [h for h in read_history(self.history_path) if h["step"] <= step]
    # Only the resume step itself can still be due; process 0's history decides for everyone.
    done_here = multihost_utils.broadcast_one_to_all(np.int32(step in {h["step"] for h in history}))
    self._done = {step} if int(done_here) else set()
    if self.is_chief:
      if os.path.exists(self.history_path):
        _write_atomically(self.history_path, "".join(json.dumps(h) + "\n" for h in history))
      self._recover_best_dir()
    metric_path = os.path.join(self.best_dir, "metric.json")
    if os.path.exists(metric_path):
      with open(metric_path) as f:
        best = json.load(f)
      if best.get("metric") != self.metric:
        raise ValueError(f"{self.best_dir} holds the best state by {best.get('metric')!r}, not by "
                         f"config.eval.best_metric={self.metric!r}; move it away to start a new best")
      self._best_value = float(best["value"])

  def due(self, step: int) -> bool:
    """Whether `step` is an evaluation step that has no history line yet."""
    return self.enabled and step > 0 and step % self.every == 0 and step not in self._done

  def run(self, state: Any, step: int, checkpoint_dir: str) -> dict:
    """Evaluates `state` at `step`; `checkpoint_dir` is its finished checkpoint (a variables dir).

    Returns the flat metrics {'task/metric': value}.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batches = self._make_batches(self.cfg, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    summary = eval_loop.evaluate(self.cfg, self.model, variables, batches, self.dataset_info,
                                 self.mesh, progress=False, predict=self._predict)
    metrics = evaluator_lib.headline(summary)
    if self.metric not in metrics:
      raise ValueError(f"config.eval.best_metric={self.metric!r} is not among the evaluation's "
                       f"metrics {sorted(metrics)}")
    value = metrics[self.metric]
    improved = value > self._best_value  # NaN never improves
    if improved:
      self._best_value = value
    if self.is_chief:
      if improved:
        self._replace_best(checkpoint_dir, step, value)
      self._append_history({"step": step, **metrics})
      eval_loop.write_scalars(self.logdir, step, metrics)
      print(f"eval at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            + f" ({summary['num_images']} images, {summary['seconds']:.1f} s)"
            + (f"; new best {self.metric}" if improved else ""), flush=True)
    self._done.add(step)
    return metrics

  def _append_history(self, line: dict) -> None:
    with open(self.history_path, "a") as f:
      f.write(json.dumps(line) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _replace_best(self, checkpoint_dir: str, step: int, value: float) -> None:
    tmp, old = self.best_dir + ".tmp", self.best_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(checkpoint_dir, "variables"), os.path.join(tmp, "variables"))
    if os.path.exists(self.config_path):
      shutil.copy(self.config_path, os.path.join(tmp, "config.json"))
    with open(os.path.join(tmp, "metric.json"), "w") as f:
      json.dump({"step": step, "metric": self.metric, "value": value}, f)
    if os.path.exists(self.best_dir):
      os.rename(self.best_dir, old)
    os.rename(tmp, self.best_dir)
    shutil.rmtree(old, ignore_errors=True)

  def _recover_best_dir(self) -> None:
    old = self.best_dir + ".old"
    if not os.path.exists(self.best_dir) and os.path.exists(old):
      os.rename(old, self.best_dir)  # killed between the two renames
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(self.best_dir + ".tmp", ignore_errors=True)


def _write_atomically(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
