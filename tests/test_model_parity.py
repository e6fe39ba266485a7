"""Full-model parity: from_hf + build_model against transformers' Mask2FormerForUniversalSegmentation."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2f_jax.convert.hf import from_hf
from m2f_jax.models import build_model
from torch_reference import hf_config, normalise, random_model, state_dict_numpy

BATCH = 2
IMAGE_HW = (64, 96)  # non-square
LEVEL_STRIDES = (32, 16, 8)


def torch_predictions(torch_model, images):
  """transformers' class [L,B,Q,K+1] and mask [L,B,Q,h,w] logits, auxiliary ones first."""
  with torch.no_grad():
    out = torch_model(normalise(images), output_auxiliary_logits=True)
  predictions = list(out.auxiliary_logits) + [
      {"class_queries_logits": out.class_queries_logits, "masks_queries_logits": out.masks_queries_logits}]
  return (np.stack([p["class_queries_logits"].numpy() for p in predictions]),
          np.stack([p["masks_queries_logits"].numpy() for p in predictions]))


def attention_mask_margin(masks, image_hw):
  """Smallest |logit| over every attention mask: prediction i resized to layer i's level."""
  margins = []
  for i in range(masks.shape[0] - 1):
    level_hw = tuple(s // LEVEL_STRIDES[i % 3] for s in image_hw)
    resized = torch.nn.functional.interpolate(torch.from_numpy(masks[i]), size=level_hw,
                                              mode="bilinear", align_corners=False)
    margins.append(resized.abs().min().item())
  return min(margins)


def safe_images(torch_model, image_hw, batch=BATCH, margin=1e-3):
  """The first random uint8 batch whose attention masks stay `margin` away from the threshold."""
  for seed in range(50):
    images = np.random.default_rng(seed).integers(0, 256, (batch,) + image_hw + (3,), dtype=np.uint8)
    classes, masks = torch_predictions(torch_model, images)
    if attention_mask_margin(masks, image_hw) > margin:
      return images, classes, masks
  raise AssertionError("no seed gave an input with a safe attention-mask margin")


def assert_close_to_scale(ours, reference, rel=1e-4):
  """Every prediction within `rel` of the reference logit scale."""
  ours = np.asarray(ours)
  assert ours.shape == reference.shape and ours.dtype == np.float32
  for layer, (a, b) in enumerate(zip(ours, reference)):
    error = np.abs(a - b).max() / np.abs(b).max()
    assert error < rel, f"prediction {layer}: relative error {error:.2e}"


@pytest.fixture(scope="module", params=["swin", "resnet"])
def converted(request):
  torch_model = random_model(hf_config(request.param), seed=1)
  cfg, variables = from_hf(torch_model.config.to_dict(), state_dict_numpy(torch_model))
  model = build_model(cfg)
  return torch_model, cfg, variables, model, jax.jit(model.apply)


def test_parity_all_predictions(converted):
  torch_model, cfg, variables, _, apply = converted
  images, classes, masks = safe_images(torch_model, IMAGE_HW)
  out = apply(variables, images)
  assert classes.shape[0] == cfg.model.decoder.num_layers + 1
  assert_close_to_scale(out["class_logits"], classes)
  assert_close_to_scale(out["mask_logits"], masks)


def test_valid_hw_zeroes_the_padding(converted):
  _, _, variables, model, apply = converted
  images = np.random.default_rng(7).uniform(0, 255, (BATCH,) + IMAGE_HW + (3,)).astype(np.float32)
  valid_hw = np.array([[40, 70], [64, 96]], np.int32)
  padded = images.copy()
  padded[0, 40:] = model.pixel_mean  # normalises to exactly 0, like the authors' zero padding
  padded[0, :, 70:] = model.pixel_mean
  with_valid = jax.jit(model.apply)(variables, images, valid_hw=valid_hw)
  reference = apply(variables, padded)
  for key in ("class_logits", "mask_logits"):
    np.testing.assert_allclose(with_valid[key], reference[key], atol=1e-5 * np.abs(reference[key]).max())


PARAM_COUNTS = {  # transformers' counts for COCO panoptic (133 classes), frozen-BN affine included
    "coco_panoptic_r50": 44_036_998,
    "coco_panoptic_r101": 63_029_126,
    "coco_panoptic_swin_t": 47_435_264,
    "coco_panoptic_swin_l": 215_535_610,  # 200 queries
}


@pytest.mark.parametrize("config_name", sorted(PARAM_COUNTS))
def test_parameter_counts(config_name):
  cfg = importlib.import_module(f"configs.{config_name}").get_config()
  model = build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert count == PARAM_COUNTS[config_name]


@pytest.mark.parametrize("pixel_decoder_dtype", ["float32", "bfloat16"])
def test_bfloat16_runs_with_float32_class_logits(converted, pixel_decoder_dtype):
  torch_model, cfg, variables, _, apply = converted
  cfg = cfg.copy_and_resolve_references()
  cfg.model.dtype = "bfloat16"
  cfg.model.pixel_decoder.dtype = pixel_decoder_dtype
  images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
  out = jax.jit(build_model(cfg).apply)(variables, images)
  reference = apply(variables, images)
  assert out["class_logits"].dtype == jnp.float32 and out["mask_logits"].dtype == jnp.bfloat16
  for key in ("class_logits", "mask_logits"):
    assert np.isfinite(np.asarray(out[key], np.float32)).all()
    correlation = np.corrcoef(np.ravel(out[key][0]), np.ravel(reference[key][0]))[0, 1]
    assert correlation > 0.95, f"{key}: bfloat16 prediction 0 correlates {correlation:.3f} with float32"


def test_rejects_images_not_multiple_of_32(converted):
  _, _, variables, model, _ = converted
  with pytest.raises(ValueError, match="multiples of 32"):
    model.apply(variables, np.zeros((1, 64, 80, 3), np.uint8))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model.apply(variables, np.zeros((1, 64, 64), np.uint8))


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "float16", "model.dtype"),
    ("num_classes", 0, "model.num_classes"),
    ("decoder.hidden_dim", 250, "hidden_dim"),
    ("decoder.num_queries", 0, "num_queries"),
    ("pixel_decoder.conv_dim", 250, "num_groups"),
    ("pixel_decoder.dtype", "float16", "model.pixel_decoder.dtype"),
    ("pixel_std", (1.0, 0.0, 1.0), "pixel_std"),
])
def test_build_model_rejects_bad_config(key, value, message):
  cfg = importlib.import_module("configs.coco_panoptic_r50").get_config()
  section = cfg.model
  *parents, leaf = key.split(".")
  for parent in parents:
    section = section[parent]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    build_model(cfg)
