"""Multi-scale deformable sampling against transformers' grid_sample version, and the module's init."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as hf

from m2f_jax.models import ms_deform_attn as mda

SHAPES = ((3, 5), (1, 10), (12, 1), (6, 7))  # one-pixel-wide levels included
B, LQ, HEADS, DIM, POINTS = 2, 11, 3, 4, 2


def _random_inputs(seed: int):
  """value [B,S,M,D], locations [B,Lq,M,L,P,2] in [-0.3, 1.3], weights [B,Lq,M,L,P]."""
  rng = np.random.default_rng(seed)
  total = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(B, total, HEADS, DIM)).astype(np.float32)
  locations = rng.uniform(-0.3, 1.3, size=(B, LQ, HEADS, len(SHAPES), POINTS, 2)).astype(np.float32)
  weights = rng.uniform(size=(B, LQ, HEADS, len(SHAPES), POINTS)).astype(np.float32)
  return value, locations, weights


@pytest.fixture(scope="module")
def inputs():
  return _random_inputs(0)


@pytest.fixture(scope="module")
def reference_fn():
  return jax.jit(mda.ms_deform_sample_reference, static_argnums=1)


@pytest.fixture(scope="module")
def fast_fn():
  return jax.jit(mda.ms_deform_sample, static_argnums=1)


def test_locations_cover_outside_and_inside(inputs):
  _, locations, _ = inputs
  assert (locations < 0).any() and (locations > 1).any() and ((locations > 0) & (locations < 1)).mean() > 0.5


def test_reference_matches_transformers(inputs, reference_fn):
  value, locations, weights = inputs
  expected = hf.multi_scale_deformable_attention(
      torch.from_numpy(value), list(SHAPES), torch.from_numpy(locations), torch.from_numpy(weights)).numpy()
  got = np.asarray(reference_fn(value, SHAPES, locations, weights))
  assert got.shape == (B, LQ, HEADS * DIM)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fast_matches_reference(inputs, reference_fn, fast_fn):
  value, locations, weights = inputs
  np.testing.assert_allclose(np.asarray(fast_fn(value, SHAPES, locations, weights)),
                             np.asarray(reference_fn(value, SHAPES, locations, weights)), rtol=1e-5, atol=1e-5)


def test_fast_gradients_match_reference(inputs):
  value, locations, weights = inputs
  cotangent = np.random.default_rng(1).normal(size=(B, LQ, HEADS * DIM)).astype(np.float32)

  def loss(fn):
    return jax.jit(jax.grad(lambda v, l, w: jnp.sum(fn(v, SHAPES, l, w) * cotangent), argnums=(0, 1, 2)))

  grads_ref = loss(mda.ms_deform_sample_reference)(value, locations, weights)
  grads_fast = loss(mda.ms_deform_sample)(value, locations, weights)
  for name, g_ref, g_fast in zip(("value", "locations", "weights"), grads_ref, grads_fast):
    assert np.abs(np.asarray(g_ref)).max() > 0, name
    np.testing.assert_allclose(np.asarray(g_fast), np.asarray(g_ref), rtol=1e-4, atol=1e-4, err_msg=name)


def test_shape_errors_are_clear(inputs):
  value, locations, weights = inputs
  with pytest.raises(ValueError, match="value must be"):
    mda.ms_deform_sample(value, SHAPES[:2], locations, weights)
  with pytest.raises(ValueError, match="attention_weights"):
    mda.ms_deform_sample(value, SHAPES, locations, weights[..., :1])


def test_module_initial_offsets_and_weights():
  heads, levels, points, d_model = 8, 3, 4, 32
  module = mda.MSDeformAttn(d_model=d_model, n_levels=levels, n_heads=heads, n_points=points)
  shapes = ((2, 3), (4, 6), (8, 12))
  total = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(1, total, d_model)), jnp.float32)
  reference = jnp.asarray(rng.uniform(size=(1, total, levels, 2)), jnp.float32)
  variables = module.init(jax.random.key(0), query, reference, query, shapes)
  params = variables["params"]
  bias = np.asarray(params["sampling_offsets"]["bias"]).reshape(heads, levels, points, 2)
  for head in range(heads):
    angle = 2 * np.pi * head / heads
    direction = np.array([np.cos(angle), np.sin(angle)])
    direction /= np.abs(direction).max()
    for point in range(points):
      np.testing.assert_allclose(bias[head, :, point], np.tile(direction * (point + 1), (levels, 1)), atol=1e-5)
  assert np.all(np.asarray(params["sampling_offsets"]["kernel"]) == 0)
  assert np.all(np.asarray(params["attention_weights"]["kernel"]) == 0)
  assert np.all(np.asarray(params["attention_weights"]["bias"]) == 0)
  for name in ("value_proj", "output_proj"):
    kernel = np.asarray(params[name]["kernel"])
    bound = np.sqrt(6.0 / (2 * d_model))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.5 * bound, name
    assert np.all(np.asarray(params[name]["bias"]) == 0), name
  # Same numbers as transformers' initialisation of its deformable attention (its _init_weights
  # only reads the two config fields given here).
  torch_module = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(d_model, heads, levels, points)
  owner = types.SimpleNamespace(config=types.SimpleNamespace(init_xavier_std=1.0, init_std=0.02))
  hf.Mask2FormerPreTrainedModel._init_weights(owner, torch_module)
  np.testing.assert_allclose(np.asarray(params["sampling_offsets"]["bias"]),
                             torch_module.sampling_offsets.bias.detach().numpy(), atol=1e-6)
