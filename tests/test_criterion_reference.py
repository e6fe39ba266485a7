"""The packed criterion equals the plain reference (the authors' SetCriterion formulation):
losses and gradients, whole batches, micro-batches and meshes. (The packed criterion is checked
against transformers' Mask2FormerLoss in test_criterion.py.)"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m2f_jax import parallel
from m2f_jax.losses import criterion
from m2f_jax.losses import reference_criterion
from m2f_jax.training import step

NUM_LAYERS, QUERIES, CLASSES, MASK_HW, IMAGE_HW = 3, 8, 4, (16, 12), (32, 24)
# Three images: four targets, none (padding only), two; slot 2 of the first image is padding.
LABELS = np.array([[3, 0, -1, 1, 2], [-1, -1, -1, -1, -1], [1, 1, -1, -1, -1]], np.int32)


def _loss_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(class_weight=2.0, mask_weight=5.0, dice_weight=3.0, no_object_weight=0.1,
             num_points=48, oversample_ratio=3.0, importance_sample_ratio=0.75,
             matcher="hungarian", slots_per_pass=2, uncertain_selection="top_k")
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _problem(seed: int = 0):
  """Random outputs {'class_logits' [L, B, Q, K+1], 'mask_logits' [L, B, Q, h, w]} and a batch
  {'labels' [B, M], 'segment_ids' [B, 1, H, W]} with one random box per real target."""
  rng = np.random.default_rng(seed)
  batch_size = LABELS.shape[0]
  segment_ids = np.zeros((batch_size, 1) + IMAGE_HW, np.int32)
  for b, m in zip(*np.nonzero(LABELS >= 0)):
    y0, x0 = rng.integers(0, IMAGE_HW[0] - 6), rng.integers(0, IMAGE_HW[1] - 6)
    segment_ids[b, 0, y0:y0 + rng.integers(4, 20), x0:x0 + rng.integers(4, 16)] = m + 1
  outputs = {
      "class_logits": rng.normal(size=(NUM_LAYERS, batch_size, QUERIES, CLASSES + 1)),
      "mask_logits": 3.0 * rng.normal(size=(NUM_LAYERS, batch_size, QUERIES) + MASK_HW),
  }
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
  return outputs, {"labels": jnp.asarray(LABELS), "segment_ids": jnp.asarray(segment_ids)}


@functools.lru_cache(maxsize=None)
def _loss_and_grad(which: str, with_mesh: bool, **cfg_overrides):
  """jit(outputs, batch, image_index, whole_labels) -> ((total, terms), d total / d outputs)."""
  loss = {"packed": criterion.mask2former_loss,
          "reference": reference_criterion.reference_loss}[which]
  mesh = parallel.make_mesh() if with_mesh else None
  cfg = _loss_cfg(**cfg_overrides)

  def run(outputs, batch, image_index, whole_labels):
    return jax.value_and_grad(
        lambda o: loss(o, batch, jax.random.key(7), cfg, CLASSES, mesh=mesh,
                       image_index=image_index, whole_batch_labels=whole_labels),
        has_aux=True)(outputs)

  return jax.jit(run)


def _assert_same(packed, reference):
  (total_p, terms_p), grads_p = packed
  (total_r, terms_r), grads_r = reference
  assert sorted(terms_p) == sorted(terms_r)
  for name in terms_p:
    np.testing.assert_allclose(terms_r[name], terms_p[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(total_r, total_p, rtol=1e-5)
  for name in grads_p:
    scale = float(jnp.max(jnp.abs(grads_p[name])))
    assert scale > 0, name
    np.testing.assert_allclose(grads_r[name], grads_p[name], rtol=0, atol=1e-5 * scale,
                               err_msg=name)


@pytest.mark.parametrize("with_mesh", [False, True])
def test_reference_equals_packed_on_a_whole_batch(with_mesh):
  outputs, batch = _problem()
  image_index = jnp.arange(LABELS.shape[0], dtype=jnp.int32)
  args = (outputs, batch, image_index, batch["labels"])
  packed = _loss_and_grad("packed", with_mesh)(*args)
  reference = _loss_and_grad("reference", with_mesh)(*args)
  assert float(packed[0][1][f"loss_dice_{NUM_LAYERS - 1}"]) > 0  # real targets were matched
  _assert_same(packed, reference)


def test_reference_equals_packed_on_a_micro_batch():
  """Images 1 and 2 of the batch as a micro-batch, normalised by the whole batch's labels."""
  outputs, batch = _problem(seed=1)
  micro_outputs = {k: v[:, 1:] for k, v in outputs.items()}
  micro_batch = {k: v[1:] for k, v in batch.items()}
  args = (micro_outputs, micro_batch, jnp.array([1, 2], jnp.int32), batch["labels"])
  _assert_same(_loss_and_grad("packed", False)(*args), _loss_and_grad("reference", False)(*args))


def test_reference_equals_packed_with_bisection_and_scipy():
  outputs, batch = _problem(seed=2)
  image_index = jnp.arange(LABELS.shape[0], dtype=jnp.int32)
  args = (outputs, batch, image_index, batch["labels"])
  settings = dict(uncertain_selection="bisection", matcher="scipy")
  _assert_same(_loss_and_grad("packed", False, **settings)(*args),
               _loss_and_grad("reference", False, **settings)(*args))


def test_bfloat16_masks_get_bfloat16_gradients_of_the_float32_losses():
  """Mask logits in bfloat16 (a bfloat16 model's): the losses of their float32 values, and the
  gradient in bfloat16, the float32 gradient up to bfloat16 rounding."""
  outputs, batch = _problem(seed=3)
  outputs16 = dict(outputs, mask_logits=outputs["mask_logits"].astype(jnp.bfloat16))
  outputs32 = dict(outputs, mask_logits=outputs16["mask_logits"].astype(jnp.float32))
  image_index = jnp.arange(LABELS.shape[0], dtype=jnp.int32)
  (total16, _), grads16 = _loss_and_grad("packed", False)(outputs16, batch, image_index,
                                                          batch["labels"])
  (total32, _), grads32 = _loss_and_grad("packed", False)(outputs32, batch, image_index,
                                                          batch["labels"])
  np.testing.assert_allclose(total16, total32, rtol=1e-6)
  assert grads16["mask_logits"].dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(grads32["mask_logits"])))
  np.testing.assert_allclose(np.asarray(grads16["mask_logits"], np.float32),
                             grads32["mask_logits"], rtol=2e-2, atol=1e-3 * scale)


def test_train_step_criterion_is_chosen_by_config():
  cfg = ml_collections.ConfigDict({"loss": _loss_cfg(criterion="reference"),
                                   "model": {"num_classes": CLASSES}})
  outputs, batch = _problem()
  total, _ = step.default_loss_fn(cfg, None)(outputs, batch, jax.random.key(7))
  expected, _ = reference_criterion.reference_loss(outputs, batch, jax.random.key(7), cfg.loss,
                                                   CLASSES)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  cfg.loss.criterion = "dense"
  with pytest.raises(ValueError, match="loss.criterion must be one of"):
    step.default_loss_fn(cfg, None)
