"""Evaluation during training: history lines equal to evaluating the checkpoints, best/, resume."""
import json
import os

import jax
import numpy as np
import pytest

import test_training
from m2f_jax import data
from m2f_jax import parallel
from m2f_jax.evaluation import evaluator as evaluator_lib
from m2f_jax.evaluation import loop as eval_loop
from m2f_jax.models import build_model
from m2f_jax.training import checkpointing
from m2f_jax.training import loop
from m2f_jax.training import periodic_eval
from m2f_jax.training import step as step_lib


class _Killed(Exception):
  """Stands in for a SIGKILL at a chosen point of the evaluation."""


def _config(data_dir):
  cfg = test_training.tiny_config()
  cfg.model.num_classes = 8
  cfg.data.data_dir = str(data_dir)
  cfg.data.synthetic.update(train_size=2, validation_size=5, image_size=64)
  cfg.data.min_size_test = cfg.data.max_size_test = 64
  cfg.data.eval_pad_size = (64, 64)
  cfg.eval.batch_size = 2
  cfg.eval.best_metric = "semantic/mACC"  # changes over these few steps (PQ stays 0)
  cfg.eval_every = 2
  cfg.checkpoint_every = 3    # evaluation steps 2 and 4 save checkpoints of their own
  cfg.keep_checkpoints = 10
  return cfg


def _train(cfg, workdir):
  loss_fn = test_training.nan_when_flagged(step_lib.default_loss_fn(cfg, parallel.make_mesh()))
  return loop.train(cfg, str(workdir), loss_fn=loss_fn,
                    make_iterator=test_training.synthetic_batches)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, request):
  root = tmp_path_factory.mktemp("periodic")
  cfg = _config(root / "tfds")
  data.get_builder(cfg.data)  # prepared once, before any run reads it
  predict_fns = []
  original = eval_loop.make_predict_fn

  def recording(*args):
    predict_fns.append(original(*args))
    return predict_fns[-1]

  mp = pytest.MonkeyPatch()
  mp.setattr(eval_loop, "make_predict_fn", recording)
  try:
    _, finished = _train(cfg, root / "run")
  finally:
    mp.undo()
  assert finished
  return dict(cfg=cfg, root=root, workdir=root / "run", predict_fns=predict_fns)


def test_history_equals_evaluating_each_checkpoint(straight):
  cfg, workdir = straight["cfg"], straight["workdir"]
  history = periodic_eval.read_history(str(workdir / "eval_history.jsonl"))
  assert [h["step"] for h in history] == [2, 4, 6]
  # One forward function, compiled once, served all three evaluations.
  assert len(straight["predict_fns"]) == 1 and straight["predict_fns"][0]._cache_size() == 1
  mesh, model = parallel.make_mesh(), build_model(cfg)
  predict = eval_loop.make_predict_fn(model, mesh)
  info = data.get_dataset_info(cfg.data)
  for line in history:
    variables = eval_loop.load_variables(cfg, model, str(workdir / "checkpoints" / str(line["step"])),
                                         mesh)
    summary = eval_loop.evaluate(cfg, model, variables, data.eval_iterator(cfg), info, mesh,
                                 progress=False, predict=predict)
    expected = {"step": line["step"], **evaluator_lib.headline(summary)}
    assert json.dumps(expected) == json.dumps(line)  # NaN (no large objects) compares equal here
  assert len({h["semantic/mACC"] for h in history}) > 1  # best/ is a real choice
  best = max(history, key=lambda h: h["semantic/mACC"])
  with open(workdir / "best" / "metric.json") as f:
    assert json.load(f) == {"step": best["step"], "metric": "semantic/mACC",
                            "value": best["semantic/mACC"]}
  jax.tree.map(np.testing.assert_array_equal, checkpointing.restore_variables(str(workdir / "best")),
               checkpointing.restore_variables(str(workdir / "checkpoints" / str(best["step"]))))
  assert os.path.exists(workdir / "best" / "config.json")
  assert any(files for _, _, files in os.walk(workdir / "tensorboard" / "eval"))


def test_kill_during_evaluation_then_resume_keeps_history_and_best(straight, tmp_path):
  """A run killed at step 4 after its checkpoint and best/ update, before the history line, resumes
  with the history and best/ of the uninterrupted run: no line lost or written twice."""
  cfg, workdir = straight["cfg"], tmp_path / "run"
  original = periodic_eval.PeriodicEvaluator._append_history

  def dies_at_step_4(self, line):
    if line["step"] == 4:
      with open(workdir / "eval_history.jsonl", "a") as f:
        f.write('{"step": 4, "pan')  # a torn line, as a kill mid-write leaves
      os.makedirs(workdir / "best.tmp" / "variables")  # a later best's copy, interrupted
      raise _Killed()
    return original(self, line)

  mp = pytest.MonkeyPatch()
  mp.setattr(periodic_eval.PeriodicEvaluator, "_append_history", dies_at_step_4)
  try:
    with pytest.raises(_Killed):
      _train(cfg, workdir)
  finally:
    mp.undo()
  assert [h["step"] for h in periodic_eval.read_history(str(workdir / "eval_history.jsonl"))] == [2]
  # best/ already holds the best of steps 2 and 4 (step 4's checkpoint and best/ come before its line).
  first_two = periodic_eval.read_history(str(straight["workdir"] / "eval_history.jsonl"))[:2]
  with open(workdir / "best" / "metric.json") as f:
    assert json.load(f)["step"] == max(first_two, key=lambda h: h["semantic/mACC"])["step"]
  _, finished = _train(cfg, workdir)
  assert finished
  for name in ("eval_history.jsonl", os.path.join("best", "metric.json")):
    assert (workdir / name).read_text() == (straight["workdir"] / name).read_text(), name
  assert not os.path.exists(str(workdir / "best") + ".tmp")
  jax.tree.map(np.testing.assert_array_equal, checkpointing.restore_variables(str(workdir / "best")),
               checkpointing.restore_variables(str(straight["workdir"] / "best")))
