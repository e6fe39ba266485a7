"""Evaluation at the recipes' test sizes: ADE20K (shortest 512, longest 2048) and Cityscapes
(1024, 2048) on miniature official-layout files holding an image wider than 2.6:1 and one at the
maximum test size; every image is evaluated at the size the authors test it at.

The model runs on the Cityscapes frame only (1024 x 2048 on CPU); ADE20K's 2048 x 2048 frame
goes through the same code with a larger shape, so its test checks the input pipeline."""
import logging
import os

import jax
import numpy as np
from PIL import Image
import pytest

from configs import ade20k_semantic_r50
from configs import cityscapes_semantic_r50
from configs import synthetic
from m2f_jax import data
from m2f_jax import parallel
from m2f_jax.evaluation import loop
from m2f_jax.models import build_model
from m2f_jax.training import state as state_lib


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _tiny_model(cfg):
  cfg.model.backbone = synthetic.get_config().model.backbone  # the demo's small ResNet
  cfg.model.backbone.update(stem_width=8, base_width=8)
  cfg.model.pixel_decoder.update(conv_dim=32, mask_dim=32, num_layers=1, num_heads=2, ffn_dim=64,
                                 num_groups=4)
  cfg.model.decoder.update(num_queries=4, hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=1)
  cfg.eval.batch_size = 1
  return cfg


def _evaluate(cfg):
  """Batches of the recipe's eval pipeline and the semantic evaluation of a random tiny model."""
  batches = list(data.eval_iterator(cfg))
  mesh, model = parallel.make_mesh(), build_model(cfg)
  variables = jax.device_put(state_lib.init_variables(model, jax.random.key(0), (64, 64)),
                             parallel.replicated(mesh))
  summary = loop.evaluate(cfg, model, variables, batches, data.get_dataset_info(cfg.data), mesh,
                          progress=False)
  return batches, summary


def _sizes(batches):
  return {int(b["image_id"][0]): (b["image"].shape[1:3], tuple(b["valid_hw"][0]),
                                  b["ground_truth"][0]["semantic"].shape) for b in batches}


def test_ade20k_wide_and_largest_images(tmp_path, caplog):
  cfg = _tiny_model(ade20k_semantic_r50.get_config())
  cfg.data.update(manual_dir=str(tmp_path / "ade"), data_dir=str(tmp_path / "tfds"))
  base = tmp_path / "ade" / "ADEChallengeData2016"
  rng = np.random.default_rng(0)
  for name, (h, w) in (("00000001", (100, 300)),     # 3:1 -> 512 x 1536
                       ("00000002", (256, 1024)),    # 4:1 -> 512 x 2048, the maximum test size
                       ("00000003", (1024, 256))):   # tall: 2048 x 512
    for folder in ("training", "validation"):
      stem = f"ADE_{'train' if folder == 'training' else 'val'}_{name}"
      _save(str(base / "images" / folder / f"{stem}.jpg"), rng.integers(0, 255, (h, w, 3), np.uint8))
      _save(str(base / "annotations" / folder / f"{stem}.png"),
            rng.integers(0, 151, (h, w)).astype(np.uint8))
  with caplog.at_level(logging.WARNING):
    batches = list(data.eval_iterator(cfg))
  assert _sizes(batches) == {1: ((2048, 2048), (512, 1536), (100, 300)),
                             2: ((2048, 2048), (512, 2048), (256, 1024)),
                             3: ((2048, 2048), (2048, 512), (1024, 256))}
  assert "evaluated smaller" not in caplog.text


def test_cityscapes_wide_and_full_size_images(tmp_path, caplog):
  cfg = _tiny_model(cityscapes_semantic_r50.get_config())
  cfg.data.update(manual_dir=str(tmp_path / "cs"), data_dir=str(tmp_path / "tfds"))
  rng = np.random.default_rng(1)
  for index, (h, w) in enumerate(((1024, 2048),      # the maximum test size, kept as it is
                                  (300, 800),        # 2.67:1 -> 768 x 2048
                                  (600, 400))):      # tall: does not fit 1024 x 2048
    labels = rng.choice([7, 23, 26], (h, w)).astype(np.uint8)
    for split in ("train", "val"):
      stem = os.path.join(split, "aachen", f"aachen_000000_00001{index}")
      _save(str(tmp_path / "cs" / "leftImg8bit" / f"{stem}_leftImg8bit.png"),
            rng.integers(0, 255, (h, w, 3), np.uint8))
      _save(str(tmp_path / "cs" / "gtFine" / f"{stem}_gtFine_labelIds.png"), labels)
      _save(str(tmp_path / "cs" / "gtFine" / f"{stem}_gtFine_instanceIds.png"),
            labels.astype(np.uint16))
  with caplog.at_level(logging.WARNING):
    batches, summary = _evaluate(cfg)
  sizes = sorted(_sizes(batches).values(), key=lambda s: s[2])
  assert sizes == [((1024, 2048), (768, 2048), (300, 800)),
                   ((1024, 2048), (1024, 682), (600, 400)),   # scaled to fit the frame
                   ((1024, 2048), (1024, 2048), (1024, 2048))]
  assert summary["num_images"] == 3 and 0 <= summary["semantic"]["mIoU"] <= 100
  assert "1 evaluation images did not fit cfg.data.eval_pad_size=(1024, 2048)" in caplog.text


def test_a_frame_that_cannot_hold_wide_images_is_refused():
  cfg = ade20k_semantic_r50.get_config()
  cfg.data.eval_pad_size = (1344, 1344)
  with pytest.raises(ValueError, match=r"eval_pad_size=\(1344, 1344\) cannot hold a wide image"):
    next(data.eval_iterator(cfg))
