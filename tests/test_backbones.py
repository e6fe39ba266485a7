"""Backbones (ResNet, Swin) against transformers' PyTorch code, parameter counts, norms, converter."""
import copy
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from configs.base import resnet_backbone, swin_backbone
from m2f_jax.convert.hf_backbone import convert_hf_backbone
from m2f_jax.models.backbone import build_backbone
from m2f_jax.models import swin
from m2f_jax.models.resnet import BatchNorm
import torch_reference

ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]
KEYS_FILE = torch_reference.AUTHORS_R50_KEYS


def _padding_swin_config() -> transformers.SwinConfig:
  """Window 3, two blocks a stage: on a 128x160 input every stage (32x40 .. 4x5) is padded
  to the window and shifted, and every stage stays larger than the window."""
  return transformers.SwinConfig(
      embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=3, image_size=64,
      drop_path_rate=0.0, out_features=ALL_STAGES)


def _random_images(shape, seed):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _normalised_nhwc(images):
  return torch_reference.normalise(images).numpy().transpose(0, 2, 3, 1)


def _torch_encoder(backbone: str, backbone_config=None, seed: int = 0):
  overrides = {} if backbone_config is None else dict(backbone_config=backbone_config)
  model = torch_reference.random_model(torch_reference.hf_config(backbone, **overrides), seed=seed)
  return model.model.pixel_level_module.encoder


def _convert(encoder):
  return convert_hf_backbone(encoder.config.to_dict(), torch_reference.state_dict_numpy(encoder))


def _max_relative_errors(encoder, images, module, variables):
  """max|ours - torch| / max|torch| for each of the four maps."""
  with torch.no_grad():
    ref = encoder(torch_reference.normalise(images)).feature_maps
  ours = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, _normalised_nhwc(images))
  errors = {}
  for name, r in zip(("res2", "res3", "res4", "res5"), ref):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert ours[name].shape == r.shape, (name, ours[name].shape, r.shape)
    errors[name] = float(np.max(np.abs(np.asarray(ours[name]) - r)) / np.max(np.abs(r)))
  return errors


def _count(module, size=224):
  images = jnp.zeros((1, size, size, 3))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), images, train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def _torch_count(module_cls, config):
  with torch.device("meta"):
    model = module_cls(config)
  return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ parity

@pytest.fixture(scope="module")
def resnet_encoder():
  return _torch_encoder("resnet")


@pytest.fixture(scope="module")
def swin_encoder():
  return _torch_encoder("swin")


def test_resnet_frozen_bn_parity(resnet_encoder):
  cfg, variables = _convert(resnet_encoder)
  assert cfg.norm == "frozen_bn" and tuple(cfg.stage_blocks) == (1, 2, 1, 1)
  images = _random_images((2, 64, 96, 3), 1)
  errors = _max_relative_errors(resnet_encoder, images, build_backbone(cfg), variables)
  assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("height,width", [(160, 224), (64, 96)])
def test_swin_parity_with_window_padding(swin_encoder, height, width):
  # Window 4. 160x224: stages 40x56, 20x28, 10x14 (padded, shifted), 5x7 (padded).
  # 64x96: stages 4x6 and 2x3 are no larger than the window; transformers 5.24's SwinBackbone
  # (always_partition=True) pads them and keeps the shift, as the authors do.
  cfg, variables = _convert(swin_encoder)
  images = _random_images((2, height, width, 3), 2)
  errors = _max_relative_errors(swin_encoder, images, build_backbone(cfg), variables)
  assert max(errors.values()) < 1e-4, errors


def test_resnet_sync_bn_training_parity(resnet_encoder):
  """sync_bn with train=True against PyTorch BatchNorm2d in training mode (one device = global batch)."""
  cfg, variables = _convert(resnet_encoder)
  cfg.norm = "sync_bn"
  module = build_backbone(cfg)
  images = _random_images((2, 64, 96, 3), 10)
  encoder = copy.deepcopy(resnet_encoder).train()
  with torch.no_grad():
    ref = encoder(torch_reference.normalise(images)).feature_maps
  ours, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, _normalised_nhwc(images))
  for name, r in zip(("res2", "res3", "res4", "res5"), ref):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert np.max(np.abs(np.asarray(ours[name]) - r)) / np.max(np.abs(r)) < 1e-4, name
  _, torch_stats = _convert(encoder)
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(torch_stats["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert not np.allclose(updates["batch_stats"]["res5"]["block0"]["conv3"]["norm"]["var"],
                         variables["batch_stats"]["res5"]["block0"]["conv3"]["norm"]["var"])


def test_swin_parity_every_stage_padded_and_shifted():
  encoder = _torch_encoder("swin", _padding_swin_config(), seed=3)
  cfg, variables = _convert(encoder)
  assert cfg.window_size == 3
  images = _random_images((2, 128, 160, 3), 4)
  errors = _max_relative_errors(encoder, images, build_backbone(cfg), variables)
  assert max(errors.values()) < 1e-4, errors


# ------------------------------------------------------------------------------------ parameter counts

def test_exact_gelu_value_and_gradient_equal_torch():
  x = np.concatenate([np.linspace(-9.0, 9.0, 1001), [0.0, -40.0, 40.0]]).astype(np.float32)
  value, grad_fn = jax.vjp(swin.exact_gelu, jnp.asarray(x))
  cotangent = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  x_torch = torch.from_numpy(x).requires_grad_()
  torch_value = torch.nn.functional.gelu(x_torch)
  torch_value.backward(torch.from_numpy(cotangent))
  np.testing.assert_allclose(np.asarray(value), torch_value.detach().numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_fn(jnp.asarray(cotangent))[0]),
                             x_torch.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_resnet50_parameter_count_matches_authors_checkpoint():
  authors = 0
  with open(KEYS_FILE) as f:
    for line in f:
      match = re.match(r"^(backbone\.\S+) \[([\d, ]*)\]$", line.strip())
      if match and not match.group(1).endswith(("running_mean", "running_var")):
        authors += int(np.prod([int(d) for d in match.group(2).split(",")]))
  ours = _count(build_backbone(resnet_backbone(50)))
  assert ours == authors == 23_508_032


def test_resnet101_parameter_count_matches_transformers():
  hf = _torch_count(transformers.ResNetBackbone,
                    transformers.ResNetConfig(depths=[3, 4, 23, 3], out_features=ALL_STAGES))
  assert _count(build_backbone(resnet_backbone(101))) == hf == 42_500_160


def _swin_count_from_architecture(embed_dim, depths, num_heads, window_size, patch=4, mlp_ratio=4):
  """The authors' D2 Swin: patch embedding, blocks, patch merging, the four output norms."""
  total = 3 * patch * patch * embed_dim + embed_dim + 2 * embed_dim
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    c, hidden = embed_dim * 2**i, embed_dim * 2**i * mlp_ratio
    block = (2 * c + (3 * c * c + 3 * c) + (c * c + c) + (2 * window_size - 1) ** 2 * heads
             + 2 * c + (c * hidden + hidden) + (hidden * c + c))
    total += depth * block + 2 * c
    if i < 3:
      total += 2 * 4 * c + 4 * c * 2 * c
  return total


@pytest.mark.parametrize("size", ["tiny", "large"])
def test_swin_parameter_count(size):
  cfg = swin_backbone(size)
  authors = _swin_count_from_architecture(cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size)
  hf = _torch_count(transformers.SwinBackbone, transformers.SwinConfig(
      embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
      window_size=cfg.window_size, out_features=ALL_STAGES))
  final_norm = 2 * cfg.embed_dim * 8  # transformers' unused final LayerNorm
  assert _count(build_backbone(cfg)) == authors == hf - final_norm
  if size == "tiny":
    assert authors == 27_520_698


# ------------------------------------------------------------------------------------ drop path

def test_swin_drop_path_only_in_training():
  cfg = swin_backbone("tiny")
  cfg.update(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=2,
             drop_path_rate=0.5)
  module = build_backbone(cfg)
  x = jnp.asarray(_normalised_nhwc(_random_images((2, 64, 64, 3), 5)))
  variables = jax.jit(lambda key: module.init(key, x, train=False))(jax.random.PRNGKey(0))
  apply = jax.jit(lambda key, train: module.apply(variables, x, train=train, rngs={"dropout": key}),
                  static_argnums=1)
  train_a, train_b = apply(jax.random.PRNGKey(1), True), apply(jax.random.PRNGKey(2), True)
  eval_a, eval_b = apply(jax.random.PRNGKey(1), False), apply(jax.random.PRNGKey(2), False)
  assert not np.allclose(train_a["res5"], train_b["res5"])
  assert not np.allclose(train_a["res5"], eval_a["res5"])
  for name in eval_a:
    np.testing.assert_array_equal(eval_a[name], eval_b[name])


@pytest.mark.parametrize("name", ["resnet", "swin"])
def test_bfloat16_compute_keeps_float32_params_and_stays_close(name):
  if name == "resnet":
    cfg = resnet_backbone(50)
    cfg.update(stage_blocks=(1, 1, 1, 1), stem_width=8, base_width=4)
  else:
    cfg = swin_backbone("tiny")
    cfg.update(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=3)
  x = jnp.asarray(_normalised_nhwc(_random_images((1, 64, 96, 3), 9)))
  full, half = build_backbone(cfg, "float32"), build_backbone(cfg, "bfloat16")
  variables = jax.jit(lambda key: half.init(key, x, train=False))(jax.random.PRNGKey(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  reference = jax.jit(lambda v: full.apply(v, x, train=False))(variables)
  ours = jax.jit(lambda v: half.apply(v, x, train=False))(variables)
  for key in reference:
    assert ours[key].dtype == jnp.bfloat16
    difference = jnp.abs(ours[key].astype(jnp.float32) - reference[key])
    error = jnp.max(difference) / jnp.max(jnp.abs(reference[key]))
    assert error < 3e-2, (key, float(error))


# ------------------------------------------------------------------------------------ BatchNorm modes

def _random_batch_norm_variables(channels, seed):
  rng = np.random.default_rng(seed)
  return {"params": {"scale": 1 + 0.2 * rng.standard_normal(channels, dtype=np.float32),
                     "bias": rng.standard_normal(channels, dtype=np.float32)},
          "batch_stats": {"mean": rng.standard_normal(channels, dtype=np.float32),
                          "var": 0.5 + rng.random(channels, dtype=np.float32)}}


def test_sync_bn_training_uses_and_tracks_batch_statistics():
  x = 3.0 + 2.0 * np.random.default_rng(6).standard_normal((4, 5, 6, 3), dtype=np.float32)
  variables = _random_batch_norm_variables(3, 7)
  bn = BatchNorm("sync_bn", eps=1e-5)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  scale, bias = variables["params"]["scale"], variables["params"]["bias"]
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5, atol=1e-5)
  n = x.size // 3
  old = variables["batch_stats"]
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * old["var"] + 0.1 * var * n / (n - 1),
                             rtol=1e-5)
  # Evaluation normalises with the running statistics, as frozen BN always does.
  running = (x - old["mean"]) / np.sqrt(old["var"] + 1e-5) * scale + bias
  np.testing.assert_allclose(bn.apply(variables, x, train=False), running, rtol=1e-5, atol=1e-5)
  frozen_train, frozen_updates = BatchNorm("frozen_bn").apply(variables, x, train=True,
                                                              mutable=["batch_stats"])
  np.testing.assert_allclose(frozen_train, running, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(frozen_updates["batch_stats"]["var"], old["var"])


def test_resnet_norm_modes_share_variables_and_frozen_bn_gets_no_gradient():
  cfg = resnet_backbone(50)
  cfg.update(stage_blocks=(1, 1, 1, 1), stem_width=8, base_width=4)
  x = jnp.asarray(_normalised_nhwc(_random_images((2, 64, 64, 3), 8)))
  frozen = build_backbone(cfg)
  cfg.norm = "sync_bn"
  sync = build_backbone(cfg)
  variables = jax.jit(lambda key: frozen.init(key, x, train=False))(jax.random.PRNGKey(0))
  sync_shapes = jax.eval_shape(lambda: sync.init(jax.random.PRNGKey(0), x, train=False))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(lambda s: s.shape, sync_shapes)

  def loss(params, module):
    out, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
    return sum(jnp.sum(jnp.square(v)) for v in out.values()), updates

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  frozen_grads, frozen_updates = grad(variables["params"], frozen)
  sync_grads, sync_updates = grad(variables["params"], sync)
  stem_norm = lambda tree: tree["stem"]["conv1"]["norm"]
  assert not np.any(stem_norm(frozen_grads)["scale"]) and not np.any(stem_norm(frozen_grads)["bias"])
  assert np.any(stem_norm(sync_grads)["scale"]) and np.any(frozen_grads["stem"]["conv1"]["kernel"])
  np.testing.assert_array_equal(stem_norm(frozen_updates["batch_stats"])["mean"],
                                stem_norm(variables["batch_stats"])["mean"])
  assert not np.allclose(stem_norm(sync_updates["batch_stats"])["mean"],
                         stem_norm(variables["batch_stats"])["mean"])


# ------------------------------------------------------------------------------ converter and builder

def test_swin_hub_and_in_memory_names_convert_identically(swin_encoder, tmp_path):
  # save_pretrained writes transformers' Hub names (attention.self.query, intermediate.dense, ...).
  model = torch_reference.random_model(torch_reference.hf_config("swin"))
  model.save_pretrained(str(tmp_path))
  prefix = "model.pixel_level_module.encoder."
  saved = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  hub = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
  assert "encoder.layers.0.blocks.0.attention.self.query.weight" in hub
  in_memory = torch_reference.state_dict_numpy(model.model.pixel_level_module.encoder)
  assert "swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in in_memory
  config = model.config.backbone_config.to_dict()
  cfg_hub, from_hub = convert_hf_backbone(config, hub)
  cfg_mem, from_memory = convert_hf_backbone(config, in_memory)
  assert cfg_hub == cfg_mem
  assert jax.tree.structure(from_hub) == jax.tree.structure(from_memory)
  for a, b in zip(jax.tree.leaves(from_hub), jax.tree.leaves(from_memory)):
    np.testing.assert_array_equal(a, b)
  qkv = from_memory["params"]["layer0"]["block0"]["attn"]["qkv"]["kernel"]
  key_weight = in_memory["swin.encoder.layers.0.blocks.0.attention.k_proj.weight"]  # [C, C], C = 32
  np.testing.assert_array_equal(qkv[:, 32:64], key_weight.T)


def test_converter_rejects_wrong_names(swin_encoder, resnet_encoder):
  config = swin_encoder.config.to_dict()
  state = torch_reference.state_dict_numpy(swin_encoder)
  missing = dict(state)
  del missing["swin.encoder.layers.1.blocks.0.mlp.fc1.bias"]
  with pytest.raises(ValueError, match=r"missing names \['swin.encoder.layers.1.blocks.0.mlp.fc1.bias"):
    convert_hf_backbone(config, missing)
  extra = "swin.encoder.layers.0.blocks.0.attention.extra"
  with pytest.raises(ValueError, match=rf"unexpected names \['{extra}'\]"):
    convert_hf_backbone(config, {**state, extra: np.zeros(3)})
  renamed = dict(state)
  renamed["encoder.layers.0.blocks.0.attention.self.query.weight"] = renamed[
      "swin.encoder.layers.0.blocks.0.attention.q_proj.weight"]
  with pytest.raises(ValueError, match="given twice"):
    convert_hf_backbone(config, renamed)
  resnet_state = torch_reference.state_dict_numpy(resnet_encoder)
  del resnet_state["encoder.stages.2.layers.0.shortcut.normalization.running_var"]
  with pytest.raises(ValueError, match=r"missing names.*stages\.2\.layers\.0\.shortcut\.normalization"):
    convert_hf_backbone(resnet_encoder.config.to_dict(), resnet_state)
  with pytest.raises(ValueError, match="use_absolute_embeddings"):
    convert_hf_backbone({**config, "use_absolute_embeddings": True}, state)
  with pytest.raises(ValueError, match="model_type"):
    convert_hf_backbone({**config, "model_type": "convnext"}, state)


def test_converter_rejects_wrong_shapes(swin_encoder):
  config = swin_encoder.config.to_dict()
  with pytest.raises(ValueError, match="shapes do not match"):
    convert_hf_backbone({**config, "window_size": 5}, torch_reference.state_dict_numpy(swin_encoder))


def test_build_backbone_rejects_bad_configs():
  cfg = resnet_backbone(50)
  cfg.name = "vit"
  with pytest.raises(ValueError, match="backbone.name must be one of"):
    build_backbone(cfg)
  cfg = resnet_backbone(50)
  cfg.stage_blocks = (3, 4, 6)
  with pytest.raises(ValueError, match="stage_blocks must be 4 positive counts"):
    build_backbone(cfg)
  cfg = resnet_backbone(50)
  cfg.norm = "group_norm"
  with pytest.raises(ValueError, match="norm must be one of"):
    build_backbone(cfg)
  with pytest.raises(ValueError, match="compute dtype"):
    build_backbone(swin_backbone("tiny"), "int32")
