"""Fine-tuning a converted COCO model (133 classes) on a 3-class custom data set: which parameters
are re-initialised, that all others start from the checkpoint, and train.py + eval.py end to end
with configs/custom.py (the loss goes down; metrics carry the data's class names)."""
import json
import os
import re
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import pytest

from m2f_jax import parallel
from m2f_jax import variables_io
from m2f_jax.models import build_model
from m2f_jax.tools import convert
from m2f_jax.training import init_from
from m2f_jax.training import state as state_lib
import custom_data_files as files
from torch_reference import hf_config, random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_CLASSES = 133


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
  """A tiny transformers R50 Mask2Former with COCO's 133 classes, random weights, converted
  with `tools.convert --from hf` into a variables directory."""
  root = tmp_path_factory.mktemp("finetune")
  torch_model = random_model(hf_config("resnet", num_labels=COCO_CLASSES, num_queries=7,
                                       decoder_layers=2, encoder_layers=1), seed=3)
  torch_model.save_pretrained(root / "hub")
  convert.convert("hf", str(root / "hub"), str(root / "coco_r50"))
  return root


def _model_cfg(checkpoint_dir, **changes) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({"model": variables_io.load_config(str(checkpoint_dir))["model"]})
  for key, value in changes.items():
    section, name = (cfg.model, key) if "." not in key else (cfg.model[key.split(".")[0]],
                                                             key.split(".")[1])
    section[name] = value
  return cfg


def _load(checkpoint_dir, cfg):
  """init_from.load_variables into the model of `cfg`, with the model's own init as fresh values."""
  model = build_model(cfg)
  sharding = parallel.replicated(parallel.make_mesh())
  init = jax.jit(lambda: state_lib.init_variables(model, jax.random.key(1), (64, 64)),
                 out_shardings=sharding)
  once = {}
  fresh = lambda: once.setdefault("variables", init())   # compiled only when needed
  variables, messages = init_from.load_variables(str(checkpoint_dir), jax.eval_shape(init), fresh)
  return variables, messages, fresh()


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.mark.parametrize("num_queries", [7, 5])
def test_only_the_class_head_and_changed_queries_are_reinitialised(coco_checkpoint, num_queries):
  checkpoint = coco_checkpoint / "coco_r50"
  cfg = _model_cfg(checkpoint, num_classes=3, **{"decoder.num_queries": num_queries})
  variables, messages, fresh = _load(checkpoint, cfg)
  expected = {"params/decoder/head/class_embed/kernel", "params/decoder/head/class_embed/bias"}
  if num_queries != 7:
    expected |= {"params/decoder/query_feat", "params/decoder/query_embed"}
  assert sorted(messages) == sorted(
      m for m in [
          "re-initialised: decoder/head/class_embed/bias (134,) -> (4,) (134 -> 4 logits)",
          "re-initialised: decoder/head/class_embed/kernel (64, 134) -> (64, 4) (134 -> 4 logits)",
          f"re-initialised: decoder/query_embed (7, 64) -> ({num_queries}, 64) (7 -> {num_queries} queries)",
          f"re-initialised: decoder/query_feat (7, 64) -> ({num_queries}, 64) (7 -> {num_queries} queries)",
      ] if "query" not in m or num_queries != 7)
  stored, got, own = _flat(variables_io.load_variables(str(checkpoint))), _flat(variables), _flat(fresh)
  assert set(got) == set(stored) and len(got) > 100
  for name in got:
    if name in expected:
      np.testing.assert_array_equal(got[name], own[name], err_msg=name)
    else:
      np.testing.assert_array_equal(got[name], stored[name], err_msg=name)


def test_any_other_mismatch_is_an_error_naming_both_shapes(coco_checkpoint):
  checkpoint = coco_checkpoint / "coco_r50"
  cfg = _model_cfg(checkpoint, num_classes=3, **{"decoder.ffn_dim": 96})
  with pytest.raises(ValueError, match=r"shape differs: params/decoder/layers_0/ffn_in/kernel "
                                       r"checkpoint \(64, 192\) vs model \(64, 96\)"):
    _load(checkpoint, cfg)


def _model_overrides(checkpoint_dir) -> list[str]:
  """--config.model.* flags that give configs/custom.py the converted checkpoint's architecture."""
  model = variables_io.load_config(str(checkpoint_dir))["model"]
  flags = []
  for section in ("backbone", "pixel_decoder", "decoder"):
    for key, value in model[section].items():
      value = tuple(value) if isinstance(value, list) else value
      flags.append(f"--config.model.{section}.{key}={value!r}".replace("'", ""))
  return flags


def test_train_and_eval_scripts_fine_tune_on_custom_data(coco_checkpoint):
  root = coco_checkpoint
  keys = files.write_coco_panoptic(str(root / "data"))
  data_flags = [f"--config.data.custom.{k}={v}" for k, v in keys.items()] + [
      f"--config.data.data_dir={root / 'tfds'}", "--config.data.augment=none",
      "--config.data.image_size=(64, 64)", "--config.data.eval_pad_size=(64, 64)",
      f"--config.data.min_size_test={files.H}", f"--config.data.max_size_test={files.W}",
      "--config.data.max_targets=8", "--config.eval.batch_size=2"]
  common = ["--config", "configs/custom.py"] + _model_overrides(root / "coco_r50") + data_flags
  workdir = root / "run"
  train = subprocess.run(
      [sys.executable, "train.py", *common, "--workdir", str(workdir),
       f"--config.init_from={root / 'coco_r50'}", "--config.total_steps=12", "--config.batch_size=2",
       "--config.log_every=1", "--config.checkpoint_every=12", "--config.loss.num_points=256",
       "--config.optimizer.learning_rate=1e-3"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert train.returncode == 0, train.stderr[-3000:]
  log = train.stdout + train.stderr
  assert "re-initialised: decoder/head/class_embed/kernel (64, 134) -> (64, 4) (134 -> 4 logits)" in log
  assert "re-initialised: decoder/query" not in log          # same query count: kept
  losses = [float(v) for v in re.findall(r"step \d+: .*?\bloss=([0-9.e+-]+)", train.stdout)]
  assert len(losses) == 12
  assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
  with open(workdir / "config.json") as f:
    assert json.load(f)["model"]["num_classes"] == 3

  evaluate = subprocess.run([sys.executable, "eval.py", *common, "--workdir", str(workdir)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  assert re.search(r"PQ [0-9.]+  AP [0-9.]+  mIoU [0-9.]+", evaluate.stdout)
  with open(workdir / "eval_metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 2 and metrics["step"] == 12
  assert set(metrics["semantic"]["per_class"]) == set(files.NAMES)
  assert set(metrics["panoptic"]["per_class"]) <= set(files.NAMES)
  assert set(metrics["panoptic"]["per_class"]) | set(metrics["instance"]["per_class"]) == set(files.NAMES)
