"""Files and values users bring by mistake get one clear line naming the thing and the fix, and
leave every file as it was: unknown config keys, a file as --workdir, init_from without weights,
damaged safetensors and pickles, torch.save zips, PQ inputs with string ids or duplicates, and a
data set whose train split is not on disk."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import coco_panoptic_r50
from m2f_jax import command_line
from m2f_jax import data
from m2f_jax.convert import detectron2
from m2f_jax.convert import hf
from m2f_jax.evaluation import panoptic_format
from m2f_jax.evaluation import pq
from m2f_jax.training import loop
from tests.test_data_coco import _small
from tests.test_data_coco import write_coco
from tests.test_training import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(root) -> dict:
  """{relative path: sha256} of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _run(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             M2F_HUGE_PAGES="0")
  return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _last_line(proc) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ""


# ------------------------------------------------------------------ command line
def test_unknown_config_key_is_named_with_the_closest_keys(tmp_path):
  proc = _run(["train.py", "--config", "configs/synthetic.py", f"--workdir={tmp_path / 'run'}",
               "--config.model.decodr.num_queries=50"])
  assert proc.returncode != 0
  assert _last_line(proc) == (
      "error: --config.model.decodr.num_queries: configs/synthetic.py has no config key "
      "'model.decodr.num_queries'; did you mean model.decoder.num_queries, "
      "model.decoder.num_layers, model.decoder.num_heads?")
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()
  assert command_line.unknown_override(
      ["prog", "--config=configs/synthetic.py", "--config.total_steps=5"]) is None
  assert "has no config key 'zzz'; see the recipe file" in command_line.unknown_override(
      ["prog", "--config", "configs/synthetic.py", "--config.zzz=5"])


def test_workdir_that_is_a_file_is_one_line_from_train_py(tmp_path):
  path = tmp_path / "results.txt"
  path.write_text("keep me")
  proc = _run(["train.py", "--config", "configs/synthetic.py", f"--workdir={path}"])
  assert proc.returncode == 1
  assert _last_line(proc) == (f"error: --workdir={path}: {path} is a file, not a directory; "
                              "give a directory (it is created if missing)")
  assert "Traceback" not in proc.stderr and path.read_text() == "keep me"


def test_init_from_without_weights_is_named(tmp_path):
  cfg = tiny_config()
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "config.json").write_text("{}")
  cfg.init_from = str(tmp_path / "notes")
  with pytest.raises(FileNotFoundError, match=r"init_from=.*notes' holds no model variables: give "
                     r"a directory written by `python -m m2f_jax.tools.convert`"):
    loop.check_run_config(cfg)
  for holder in ("variables", "checkpoints"):  # a converted directory or a training workdir
    (tmp_path / holder / holder).mkdir(parents=True)
    cfg.init_from = str(tmp_path / holder)
    loop.check_run_config(cfg)


# ------------------------------------------------------------------ checkpoint files
def test_truncated_safetensors_names_the_file(tmp_path):
  save_file({"w": np.zeros((64, 64), np.float32)}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text("{}")
  whole = (tmp_path / "model.safetensors").read_bytes()
  (tmp_path / "model.safetensors").write_bytes(whole[: len(whole) // 2])
  before = snapshot(tmp_path)
  with pytest.raises(ValueError) as e:
    hf.load_hf_directory(str(tmp_path))
  assert str(e.value).startswith(f"{tmp_path / 'model.safetensors'} is not a readable "
                                 "safetensors file (")
  assert "download it again" in str(e.value) and "\n" not in str(e.value)
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind, message", [
    ("text", r"is not a pickle file \(it starts with b'hell'\); --src must be the authors' "
             r"detectron2 checkpoint"),
    ("torch_zip", r"is a PyTorch zip checkpoint \(torch.save\), not a detectron2 pickle: pass the "
                  r"authors' .pkl, or call m2f_jax.convert.from_detectron2"),
    ("truncated", r"is truncated or damaged \(UnpicklingError: pickle data was truncated\); "
                  r"download the checkpoint again"),
])
def test_files_that_are_no_detectron2_pickle_say_what_they_are(tmp_path, kind, message):
  path = tmp_path / "model_final.pkl"
  if kind == "text":
    path.write_text("hello, these are my notes\n")
  elif kind == "torch_zip":
    torch = pytest.importorskip("torch")
    torch.save({"model": {"w": torch.zeros(3)}}, str(path))
  else:
    whole = pickle.dumps({"model": {"w": np.zeros(1000, np.float32)}})
    path.write_bytes(whole[: len(whole) // 2])
  before = path.read_bytes()
  with pytest.raises(ValueError, match=message) as e:
    detectron2.load_detectron2_pickle(str(path))
  assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
  assert path.read_bytes() == before


# ------------------------------------------------------------------ PQ inputs
def _pq_files(tmp_path, pred_ids=(7,), pred_segment_ids=(1, 2), gt_ids=(7,)):
  ids = np.ones((8, 8), np.int64)
  ids[4:] = 2
  for side in ("gt", "pred"):
    (tmp_path / side).mkdir(exist_ok=True)
    panoptic_format.write_id_png(str(tmp_path / side / "a.png"), ids)
  categories = [dict(id=1, name="disc", isthing=1), dict(id=6, name="sky", isthing=0)]
  gt = dict(annotations=[dict(image_id=i, file_name="a.png", segments_info=[
      dict(id=1, category_id=1, iscrowd=0, area=32), dict(id=2, category_id=6, iscrowd=0, area=32)])
                         for i in gt_ids], categories=categories)
  pred = dict(annotations=[dict(image_id=i, file_name="a.png", segments_info=[
      dict(id=s, category_id=1 if k == 0 else 6) for k, s in enumerate(pred_segment_ids)])
                           for i in pred_ids], categories=categories)
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  (tmp_path / "pred.json").write_text(json.dumps(pred))
  return [f"--gt-json={tmp_path / 'gt.json'}", f"--gt-dir={tmp_path / 'gt'}",
          f"--pred-json={tmp_path / 'pred.json'}", f"--pred-dir={tmp_path / 'pred'}"]


def _pq_error(tmp_path, capsys, **files) -> str:
  args = _pq_files(tmp_path, **files)
  before = snapshot(tmp_path)
  with pytest.raises(SystemExit) as e:
    pq.main(args)
  assert snapshot(tmp_path) == before  # no results file written
  assert "\n" not in str(e.value.code)
  return str(e.value.code)


def test_pq_tool_scores_well_formed_files(tmp_path):
  pq.main(_pq_files(tmp_path))
  with open(tmp_path / "pred_pq.json") as f:
    assert json.load(f)["All"]["pq"] == pytest.approx(1.0)


def test_pq_tool_refuses_string_ids_against_integer_ids(tmp_path, capsys):
  message = _pq_error(tmp_path, capsys, pred_ids=("000000000007",))
  assert message == (f"error: {tmp_path / 'pred.json'} has string image ids (e.g. '000000000007') "
                     f"but {tmp_path / 'gt.json'} has integer ids: write integer ids "
                     "(m2f_jax.tools.predict does for all-digit file names such as "
                     "000000142238.jpg)")


def test_pq_tool_refuses_duplicate_annotations_and_segment_ids(tmp_path, capsys):
  message = _pq_error(tmp_path, capsys, pred_ids=(7, 7))
  assert message == (f"error: {tmp_path / 'pred.json'} has two annotations for image_id 7; keep "
                     "one per image")
  message = _pq_error(tmp_path, capsys, gt_ids=(7, 7))
  assert message == (f"error: {tmp_path / 'gt.json'} has two annotations for image_id 7; keep "
                     "one per image")
  message = _pq_error(tmp_path, capsys, pred_segment_ids=(1, 1))
  assert message == ("error: image 7: segment id 1 is listed twice in the prediction's "
                     "segments_info; each segment needs its own id")


# ------------------------------------------------------------------ data sets
def test_coco_with_only_the_validation_split_evaluates(tmp_path):
  root = str(tmp_path / "coco")
  write_coco(root)
  for path in ("train2017", "annotations/panoptic_train2017", "annotations/panoptic_train2017.json",
               "annotations/instances_train2017.json"):
    full = os.path.join(root, path)
    shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
  before = snapshot(root)
  cfg = _small(coco_panoptic_r50.get_config(), root, str(tmp_path / "tfds"))
  batch = next(data.eval_iterator(cfg))
  assert batch["image_id"][0] == 3 and batch["is_real"][0]
  with pytest.raises(ValueError, match=r"coco_panoptic in .* has no split 'train' \(it has "
                     r"\['validation'\]; .*add its files and delete .* to rebuild"):
    next(data.train_iterator(cfg))
  assert snapshot(root) == before
