"""PixelDecoder against transformers' Mask2FormerPixelDecoder with every weight randomised."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as hf

import torch_reference
from m2f_jax.convert.hf_pixel_decoder import convert_hf_pixel_decoder
from m2f_jax.models.pixel_decoder import PixelDecoder
from m2f_jax.models.position import sine_position_embedding

WIDTH, HEADS, LAYERS = 64, 4, 2
HEIGHT, IMG_WIDTH = 96, 160  # non-square; strides 4..32 give 24x40 down to 3x5
CHANNELS = {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


@pytest.fixture(scope="module")
def torch_decoder():
  config = torch_reference.hf_config("resnet", width=WIDTH, encoder_layers=LAYERS, num_attention_heads=HEADS)
  model = torch_reference.random_model(config, seed=3)
  return model.model.pixel_level_module.decoder


@pytest.fixture(scope="module")
def features():
  rng = np.random.default_rng(0)
  return {k: rng.normal(size=(2, HEIGHT // s, IMG_WIDTH // s, CHANNELS[k])).astype(np.float32)
          for k, s in STRIDES.items()}


@pytest.fixture(scope="module")
def module():
  return PixelDecoder(conv_dim=WIDTH, mask_dim=WIDTH, num_layers=LAYERS, num_heads=HEADS, num_points=4,
                      ffn_dim=2 * WIDTH, num_groups=32)


@pytest.fixture(scope="module")
def apply_fn(module):
  return jax.jit(module.apply)


@pytest.fixture(scope="module")
def init_params(module, features):
  return jax.jit(module.init)(jax.random.key(0), features)["params"]


@pytest.fixture(scope="module")
def outputs(torch_decoder, features, apply_fn):
  state = torch_reference.state_dict_numpy(torch_decoder)
  params = convert_hf_pixel_decoder(state)
  ours = apply_fn({"params": params}, features)
  with torch.no_grad():
    order = ("res2", "res3", "res4", "res5")
    theirs = torch_decoder([torch.from_numpy(features[k].transpose(0, 3, 1, 2).copy()) for k in order])
  return ours, theirs


def _assert_close(got, expected_nchw, name):
  expected = expected_nchw.numpy().transpose(0, 2, 3, 1)
  assert got.shape == expected.shape, name
  assert got.dtype == jnp.float32, name
  scale = np.abs(expected).max()
  assert scale > 0.1, name
  np.testing.assert_allclose(np.asarray(got) / scale, expected / scale, atol=1e-4, rtol=0, err_msg=name)


def test_mask_features_match_transformers(outputs):
  (mask_features, _), theirs = outputs
  _assert_close(mask_features, theirs.mask_features, "mask_features")


def test_multi_scale_maps_match_transformers(outputs):
  (_, multi_scale), theirs = outputs
  assert [m.shape[1:3] for m in multi_scale] == [(3, 5), (6, 10), (12, 20)]
  for level, (got, expected) in enumerate(zip(multi_scale, theirs.multi_scale_features)):
    _assert_close(got, expected, f"level {level}")


def test_bfloat16_stays_close_to_float32(torch_decoder, features, outputs):
  """dtype bfloat16: same parameters, bfloat16 maps within a few percent (RMS) of float32's."""
  (mask_features, multi_scale), _ = outputs
  module = PixelDecoder(conv_dim=WIDTH, mask_dim=WIDTH, num_layers=LAYERS, num_heads=HEADS,
                        num_points=4, ffn_dim=2 * WIDTH, num_groups=32, dtype=jnp.bfloat16)
  params = convert_hf_pixel_decoder(torch_reference.state_dict_numpy(torch_decoder))
  got_mask, got_scales = jax.jit(module.apply)({"params": params}, features)
  for got, expected in zip([got_mask] + got_scales, [mask_features] + multi_scale):
    assert got.dtype == jnp.bfloat16
    expected = np.asarray(expected)
    error = np.linalg.norm(np.asarray(got, np.float32) - expected) / np.linalg.norm(expected)
    assert error < 0.03, error


def test_converted_tree_matches_init(init_params, torch_decoder):
  converted = convert_hf_pixel_decoder(torch_reference.state_dict_numpy(torch_decoder))
  init_shapes = jax.tree.map(np.shape, flax.core.unfreeze(init_params))
  assert jax.tree.map(np.shape, converted) == init_shapes


def test_position_embedding_matches_transformers():
  module = hf.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)
  expected = module((1, 3, 5, 7), "cpu", torch.float32)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(np.asarray(sine_position_embedding(5, 7, 16)), expected, rtol=1e-5, atol=1e-6)


def test_initialisation_follows_authors(init_params):
  params = flax.core.unfreeze(init_params)
  assert np.all(params["input_proj_0"]["bias"] == 0) and np.all(params["mask_features"]["bias"] == 0)
  bound = np.sqrt(6.0 / (CHANNELS["res5"] + WIDTH))  # xavier_uniform, 1x1 conv
  kernel = np.asarray(params["input_proj_0"]["kernel"])
  assert bound / 2 < np.abs(kernel).max() <= bound
  bound = np.sqrt(3.0 / (9 * WIDTH))  # c2_xavier_fill on the 3x3 conv
  kernel = np.asarray(params["layer_1"]["kernel"])
  assert bound / 2 < np.abs(kernel).max() <= bound
  assert "bias" not in params["layer_1"] and "bias" not in params["adapter_1"]
  assert 0.5 < np.std(np.asarray(params["level_embed"])) < 1.5


def test_converter_names_problems(torch_decoder):
  state = torch_reference.state_dict_numpy(torch_decoder)
  state["encoder.layers.0.extra.weight"] = np.zeros(1)
  del state["layer_1.0.weight"]
  with pytest.raises(ValueError, match=r"missing \['layer_1.0.weight'\].*unexpected \['encoder.layers.0.extra"):
    convert_hf_pixel_decoder(state)


def test_missing_feature_is_named(module, features):
  with pytest.raises(ValueError, match="res3"):
    module.init(jax.random.key(0), {k: v for k, v in features.items() if k != "res3"})
