"""eval.py end to end on a tiny random model and a tiny synthetic data set; TTA consistency."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from m2f_jax import data
from m2f_jax import models
from m2f_jax import parallel
from m2f_jax import variables_io
from m2f_jax.evaluation import loop
from m2f_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.backbone.update(stem_width=8, base_width=8)
  c.model.pixel_decoder.update(conv_dim=32, mask_dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                               num_groups=4)
  c.model.decoder.update(num_queries=6, hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=1)
  c.data.synthetic.update(train_size=2, validation_size=5, image_size=64)
  c.data.image_size = (64, 64)
  c.data.min_size_test, c.data.max_size_test = 64, 64
  c.data.eval_pad_size = (64, 64)
  c.eval.batch_size = 2
  return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A config file, its tfds data directory and random variables saved as a variables dir."""
  root = tmp_path_factory.mktemp("eval")
  config_path = root / "tiny.py"
  config_path.write_text(TINY_CONFIG)
  sys.path.insert(0, REPO)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny_eval_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.data.data_dir = str(root / "tfds")
  model = models.build_model(cfg)
  variables = state_lib.init_variables(model, jax.random.key(0), (64, 64))
  variables_io.save_variables(str(root / "vars"), variables, cfg)
  return dict(root=root, config_path=config_path, cfg=cfg, model=model, variables=variables)


def test_eval_script_end_to_end(setup):
  root = setup["root"]
  out = root / "run"
  result = subprocess.run(
      [sys.executable, "eval.py", "--config", str(setup["config_path"]),
       f"--config.data.data_dir={root / 'tfds'}", "--checkpoint", str(root / "vars"),
       "--workdir", str(out), "--num_visualize", "2"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "eval_metrics.json") as f:
    metrics = json.load(f)
  assert metrics["num_images"] == 5
  for task, key in (("panoptic", "PQ"), ("instance", "AP"), ("semantic", "mIoU")):
    assert 0.0 <= metrics[task][key] <= 100.0
  assert '"semantic/mIoU"' in result.stdout
  assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == ["eval_0000.png", "eval_0001.png"]
  assert any(files for _, _, files in os.walk(out / "tensorboard" / "eval"))


def test_missing_checkpoint_is_a_clear_error(setup):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    loop.load_variables(setup["cfg"], setup["model"], str(setup["root"] / "nothing_here"),
                        parallel.make_mesh())


def test_augmented_images_scale_and_mirror():
  images = np.zeros((1, 64, 64, 3), np.uint8)
  images[0, :40, :50] = np.arange(50, dtype=np.uint8)[None, :, None]
  mirrored, valid = loop.augmented_images(images, np.array([[40, 50]]), 1.0, flip=True)
  np.testing.assert_array_equal(mirrored[0, :40, :50], images[0, :40, 49::-1])
  assert not mirrored[0, 40:].any() and not mirrored[0, :, 50:].any()
  half, valid = loop.augmented_images(images, np.array([[40, 50]]), 0.5, flip=False)
  assert half.shape == (1, 32, 32, 3) and valid.tolist() == [[20, 25]]


def test_tta_at_scale_one_reproduces_single_scale(setup):
  """The TTA path (one scale 1.0, no flip) must give the single-scale semantic result exactly."""
  cfg, model, variables = setup["cfg"], setup["model"], setup["variables"]
  mesh = parallel.make_mesh()
  variables = jax.device_put(variables, parallel.replicated(mesh))
  info = data.get_dataset_info(cfg.data)
  cfg.eval.tasks = ("semantic",)
  cfg.eval.max_images = 4
  plain = loop.evaluate(cfg, model, variables, data.eval_iterator(cfg), info, mesh, progress=False)
  cfg.eval.tta_scales = (1.0,)
  tta = loop.evaluate(cfg, model, variables, data.eval_iterator(cfg), info, mesh, progress=False)
  cfg.eval.tta_scales, cfg.eval.tta_flip = (0.5, 1.0), True
  multi = loop.evaluate(cfg, model, variables, data.eval_iterator(cfg), info, mesh, progress=False)
  assert plain["num_images"] == tta["num_images"] == multi["num_images"] == 4
  assert tta["semantic"]["mIoU"] == plain["semantic"]["mIoU"]
  assert tta["semantic"]["pACC"] == plain["semantic"]["pACC"]
  assert multi["semantic"]["pACC"] != plain["semantic"]["pACC"]


def test_predict_tool_writes_pictures_and_coco_panoptic(setup, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "photo.jpg")
  (tmp_path / "broken.png").write_text("not an image")
  base = [sys.executable, "-m", "m2f_jax.tools.predict", "--config", str(setup["config_path"]),
          "--checkpoint", str(setup["root"] / "vars"), "--out", str(tmp_path / "out")]
  # Unreadable images are reported before the model is loaded (a fast failure).
  bad = subprocess.run(base + [str(tmp_path / "photo.jpg"), str(tmp_path / "broken.png")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "cannot read these images" in bad.stderr
  assert "broken.png" in bad.stderr and "photo.jpg" not in bad.stderr
  good = subprocess.run(base + [str(tmp_path / "photo.jpg")], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert good.returncode == 0, good.stderr[-3000:]
  out = tmp_path / "out"
  for task in ("panoptic", "instance", "semantic"):
    assert Image.open(out / f"photo_{task}.png").size == (70, 50)
  with open(out / "panoptic" / "panoptic.json") as f:
    annotations = json.load(f)["annotations"]
  from m2f_jax.evaluation import panoptic_format  # pylint: disable=g-import-not-at-top
  ids = panoptic_format.read_id_png(str(out / "panoptic" / "photo.png"))
  assert ids.shape == (50, 70)
  assert set(np.unique(ids)) - {0} == {s["id"] for s in annotations[0]["segments_info"]}
