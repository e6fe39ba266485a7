"""Masked-attention decoder parity with transformers' Mask2FormerTransformerModule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2f_jax.convert.hf import TRANSFORMER_PREFIX, CLASS_PREFIX, config_from_hf, convert_hf_transformer_decoder
from m2f_jax.models.bilinear import interpolation_matrix, resize_bilinear
from m2f_jax.models import transformer_decoder
from m2f_jax.models.transformer_decoder import MaskedAttentionDecoder
from torch_reference import hf_config, random_model, state_dict_numpy

BATCH = 2
IMAGE_HW = (64, 96)  # non-square; levels 2x3, 4x6, 8x12, masks 16x24
LEVEL_STRIDES = (32, 16, 8)


def _decoder_and_params(torch_model):
  cfg = config_from_hf(torch_model.config.to_dict())
  state = state_dict_numpy(torch_model)
  sub = {k[len(TRANSFORMER_PREFIX):]: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
  sub.update({k: v for k, v in state.items() if k.startswith(CLASS_PREFIX)})
  dec = cfg.model.decoder
  params = convert_hf_transformer_decoder(sub, dec, cfg.model.num_classes,
                                          in_channels=torch_model.config.feature_size,
                                          mask_dim=cfg.model.pixel_decoder.mask_dim)
  module = MaskedAttentionDecoder(
      num_classes=cfg.model.num_classes, num_queries=dec.num_queries, hidden_dim=dec.hidden_dim,
      num_heads=dec.num_heads, ffn_dim=dec.ffn_dim, num_layers=dec.num_layers,
      mask_dim=cfg.model.pixel_decoder.mask_dim)
  return module, params


def _torch_decoder(torch_model, multi_scale, mask_features):
  """transformers' outputs: class [L,B,Q,K+1], masks [L,B,Q,h,w] as numpy."""
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = torch_model.model.transformer_module(
        multi_scale_features=[to_nchw(x) for x in multi_scale], mask_features=to_nchw(mask_features))
    classes = [torch_model.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
  return (np.stack([c.numpy() for c in classes]),
          np.stack([m.numpy() for m in out.masks_queries_logits]))


def _level_logits(masks, num_layers):
  """For each layer i, prediction i's mask logits resized (torch) to layer i's level: list of [B,Q,N]."""
  out = []
  for i in range(num_layers):
    level_hw = tuple(s // LEVEL_STRIDES[i % 3] for s in IMAGE_HW)
    resized = torch.nn.functional.interpolate(torch.from_numpy(masks[i]), size=level_hw,
                                              mode="bilinear", align_corners=False)
    out.append(resized.flatten(2).numpy())
  return out


def _inputs(seed, width, mask_dim, mean_scale=0.0):
  """Random pixel-decoder outputs (NHWC); `mean_scale` adds a shared vector to every mask feature."""
  rng = np.random.default_rng(seed)
  multi_scale = [rng.normal(size=(BATCH, IMAGE_HW[0] // s, IMAGE_HW[1] // s, width)).astype(np.float32)
                 for s in LEVEL_STRIDES]
  mask_features = rng.normal(size=(BATCH, IMAGE_HW[0] // 4, IMAGE_HW[1] // 4, mask_dim))
  mask_features += mean_scale * rng.normal(size=(BATCH, 1, 1, mask_dim))
  return multi_scale, mask_features.astype(np.float32)


def _search_inputs(torch_model, width, mask_dim, num_layers, mean_scale=0.0, need_fully_blocked=False):
  """First seed whose attention-mask logits keep 1e-3 away from 0 (and, if asked, block a query fully)."""
  for seed in range(50):
    multi_scale, mask_features = _inputs(seed, width, mask_dim, mean_scale)
    classes, masks = _torch_decoder(torch_model, multi_scale, mask_features)
    level_logits = _level_logits(masks, num_layers)
    margin = min(np.abs(x).min() for x in level_logits)
    fully_blocked = sum(int((x < 0).all(-1).sum()) for x in level_logits)
    if margin > 1e-3 and (fully_blocked > 0 or not need_fully_blocked):
      return multi_scale, mask_features, classes, masks, level_logits
  raise AssertionError("no seed gave inputs with a safe attention-mask margin")


@pytest.fixture(scope="module", params=["same_width", "projected"])
def case(request):
  # 4 decoder layers so the level order wraps around (1/32, 1/16, 1/8, 1/32).
  overrides = dict(decoder_layers=5)
  if request.param == "projected":
    overrides.update(feature_size=32)  # pixel decoder narrower than the decoder: input projections
  torch_model = random_model(hf_config("swin", **overrides), seed=3)
  module, params = _decoder_and_params(torch_model)
  return torch_model, module, params


@pytest.fixture(scope="module")
def apply_fn():
  return jax.jit(lambda module, params, ms, mf: module.apply({"params": params}, ms, mf),
                 static_argnums=0)


def _check_parity(classes, masks, ours):
  our_classes, our_masks = (np.asarray(x) for x in ours)
  assert our_classes.shape == classes.shape and our_masks.shape == masks.shape
  assert np.isfinite(our_classes).all() and np.isfinite(our_masks).all()
  np.testing.assert_allclose(our_classes, classes, atol=1e-4 * np.abs(classes).max(), rtol=0)
  np.testing.assert_allclose(our_masks, masks, atol=1e-4 * np.abs(masks).max(), rtol=0)


def test_decoder_parity(case, apply_fn):
  torch_model, module, params = case
  config = torch_model.config
  multi_scale, mask_features, classes, masks, _ = _search_inputs(
      torch_model, config.feature_size, config.mask_feature_size, module.num_layers)
  assert classes.shape == (module.num_layers + 1, BATCH, config.num_queries, config.num_labels + 1)
  _check_parity(classes, masks, apply_fn(module, params, multi_scale, mask_features))


def test_fully_blocked_query_is_unblocked(case, apply_fn):
  torch_model, module, params = case
  config = torch_model.config
  multi_scale, mask_features, classes, masks, level_logits = _search_inputs(
      torch_model, config.feature_size, config.mask_feature_size, module.num_layers,
      mean_scale=3.0, need_fully_blocked=True)
  ours = apply_fn(module, params, multi_scale, mask_features)
  assert np.isfinite(masks).all() and np.isfinite(classes).all()  # transformers unblocked it too
  _check_parity(classes, masks, ours)
  # The rule fires on our side for the same queries.
  for i, torch_logits in enumerate(level_logits):
    level_hw = tuple(s // LEVEL_STRIDES[i % 3] for s in IMAGE_HW)
    our_logits = np.asarray(resize_bilinear(ours[1][i], level_hw)).reshape(torch_logits.shape)
    np.testing.assert_array_equal((our_logits < 0).all(-1), (torch_logits < 0).all(-1))
    blocked = np.asarray(MaskedAttentionDecoder.attention_blocked(ours[1][i], level_hw))
    assert not blocked.all(-1).any()


@pytest.mark.parametrize("in_size,out_size", [(24, 3), (16, 8), (7, 5), (5, 9)])
def test_resize_matches_torch(in_size, out_size):
  x = np.random.default_rng(0).normal(size=(2, 3, in_size, in_size + 1)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out_size, out_size + 2),
                                             mode="bilinear", align_corners=False).numpy()
  np.testing.assert_allclose(np.asarray(resize_bilinear(x, (out_size, out_size + 2))), expected, atol=1e-5)
  assert interpolation_matrix(in_size, out_size).sum(1) == pytest.approx(1.0)


def test_gradients_are_finite_when_a_query_is_fully_blocked(case):
  torch_model, module, params = case
  config = torch_model.config
  multi_scale, mask_features, *_ = _search_inputs(
      torch_model, config.feature_size, config.mask_feature_size, module.num_layers,
      mean_scale=3.0, need_fully_blocked=True)

  def loss(p):
    classes, masks = module.apply({"params": p}, multi_scale, mask_features)
    return classes.sum() + masks.mean()

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["layers_0"]["cross_attn"]))


def test_stacked_masks_differentiate_as_the_einsum():
  rng = np.random.default_rng(0)
  embeddings = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)  # [L, B, Q, C]
  features = jnp.asarray(rng.normal(size=(2, 6, 7, 4)), jnp.float32)  # [B, h, w, C]
  cotangent = jnp.asarray(rng.normal(size=(3, 2, 5, 6, 7)), jnp.float32)
  einsum = transformer_decoder.masks_from_embeddings

  def stacked(e, f):
    masks = einsum(jax.lax.stop_gradient(e), jax.lax.stop_gradient(f))
    return transformer_decoder._stacked_masks(e, f, masks)  # pylint: disable=protected-access

  expected = jax.grad(lambda e, f: jnp.sum(einsum(e, f) * cotangent), argnums=(0, 1))(embeddings, features)
  got = jax.grad(lambda e, f: jnp.sum(stacked(e, f) * cotangent), argnums=(0, 1))(embeddings, features)
  np.testing.assert_allclose(np.asarray(stacked(embeddings, features)),
                             np.asarray(einsum(embeddings, features)), rtol=1e-6)
  for g, e in zip(got, expected):
    assert np.abs(np.asarray(e)).max() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
