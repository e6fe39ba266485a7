"""Optimiser: parameter groups on the real model trees, parity with torch AdamW, schedules."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import base
from m2f_jax.models import build_model
from m2f_jax.training import optimizer


def _model_params(cfg):
  model = build_model(cfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8)))
  return variables["params"]


def _by_path(tree):
  return {optimizer._path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def r50_cfg():
  return base.get_base_config()  # ResNet-50, frozen BN


@pytest.fixture(scope="module")
def swin_cfg():
  cfg = base.get_base_config()
  cfg.model.backbone = base.swin_backbone("tiny")
  return cfg


def test_groups_on_resnet50_tree(r50_cfg):
  params = _model_params(r50_cfg)
  decay = _by_path(optimizer.decay_mask(params, r50_cfg))
  labels = _by_path(optimizer.param_labels(params, r50_cfg))
  shapes = _by_path(jax.tree.map(lambda x: int(np.prod(x.shape)), params))
  # Frozen BN: exactly the backbone's norm params, 53,120 values as in the authors' checkpoint.
  frozen = [k for k, v in labels.items() if v == optimizer.FROZEN]
  assert frozen and all(re.search(r"^backbone/.*/norm/(scale|bias)$", k) for k in frozen)
  assert sum(shapes[k] for k in frozen) == 53_120
  trainable = sum(v for k, v in shapes.items() if labels[k] != optimizer.FROZEN)
  assert trainable == 43_983_878
  assert all(v == optimizer.BACKBONE for k, v in labels.items()
             if k.startswith("backbone/") and k not in frozen)
  assert all(v == optimizer.DEFAULT for k, v in labels.items() if not k.startswith("backbone/"))
  # No decay: norms, query features/positions, the decoder's level embedding.
  for name in ("decoder/query_feat", "decoder/query_embed", "decoder/level_embed",
               "decoder/head/decoder_norm/scale", "decoder/head/decoder_norm/bias",
               "pixel_decoder/input_proj_0_norm/bias", "pixel_decoder/encoder_layer_0/norm1/scale"):
    assert decay[name] is False, name
  # Decay: every kernel and every conv/linear bias; the pixel decoder's level_embed is a plain
  # nn.Parameter in the authors' code, so it decays there.
  assert decay["pixel_decoder/level_embed"] is True
  assert decay["decoder/head/class_embed/bias"] is True
  assert all(v for k, v in decay.items() if k.endswith("/kernel"))
  no_decay = {k for k, v in decay.items() if not v}
  assert no_decay == {k for k in decay if re.search(r"norm\d?/(scale|bias)$", k)} | {
      "decoder/query_feat", "decoder/query_embed", "decoder/level_embed"}


def test_groups_on_swin_tree(swin_cfg):
  params = _model_params(swin_cfg)
  decay = _by_path(optimizer.decay_mask(params, swin_cfg))
  labels = _by_path(optimizer.param_labels(params, swin_cfg))
  tables = [k for k in decay if k.endswith("relative_position_bias_table")]
  assert len(tables) == sum(swin_cfg.model.backbone.depths)
  assert not any(decay[k] for k in tables)
  assert not any(decay[k] for k in decay if re.search(r"^backbone/(.*/)?norm\d?/(scale|bias)$", k))
  assert decay["backbone/patch_embed/proj/bias"] is True
  assert optimizer.FROZEN not in labels.values()  # LayerNorms train
  assert all((v == optimizer.BACKBONE) == k.startswith("backbone/") for k, v in labels.items())


def _toy_params():
  rng = np.random.default_rng(0)
  shapes = {"backbone": {"conv": {"kernel": (3, 4), "norm": {"scale": (4,), "bias": (4,)}}},
            "pixel_decoder": {"level_embed": (3, 4)},
            "decoder": {"query_feat": (5, 4), "class_embed": {"kernel": (4, 6), "bias": (6,)},
                        "norm": {"scale": (4,), "bias": (4,)}}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_adamw_matches_torch_param_groups_clip_and_step_schedule(r50_cfg):
  cfg = r50_cfg.copy_and_resolve_references()
  cfg.total_steps = 4
  cfg.optimizer.step_fractions = (0.5, 0.75)
  cfg.optimizer.clip_norm = 0.5
  params = _toy_params()
  tx, schedule = optimizer.build_optimizer(cfg)
  paths = _by_path(params)
  tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in paths.items()}
  frozen = {"backbone/conv/norm/scale", "backbone/conv/norm/bias"}
  no_decay = {"decoder/query_feat", "decoder/norm/scale", "decoder/norm/bias"}
  groups = []
  for k, t in tensors.items():
    if k in frozen:
      continue  # authors: FrozenBatchNorm2d buffers, not optimised
    lr = 1e-4 * (0.1 if k.startswith("backbone/") else 1.0)
    groups.append({"params": [t], "lr": lr, "weight_decay": 0.0 if k in no_decay else 0.05})
  torch_opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
  torch_sched = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=[2, 3], gamma=0.1)

  opt_state = tx.init(params)
  rng = np.random.default_rng(1)
  for step in range(4):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    for k, t in tensors.items():
      t.grad = torch.from_numpy(_by_path(grads)[k].copy())
    trainable = [t for k, t in tensors.items() if k not in frozen]
    for k in frozen:
      tensors[k].grad = None  # a buffer in torch; our frozen grads are zeroed before clipping
    torch.nn.utils.clip_grad_norm_(trainable, 0.5)
    torch_opt.step()
    torch_sched.step()
    assert float(schedule(step)) == pytest.approx(1e-4 * 0.1 ** (step >= 2) * 0.1 ** (step >= 3))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  ours = _by_path(params)
  for k, t in tensors.items():
    np.testing.assert_allclose(ours[k], t.detach().numpy(), rtol=2e-5, atol=1e-7, err_msg=k)
  for k in frozen:  # exactly unchanged
    np.testing.assert_array_equal(ours[k], _by_path(_toy_params())[k])


def test_poly_schedule_matches_torch(r50_cfg):
  cfg = r50_cfg.copy_and_resolve_references()
  cfg.optimizer.schedule = "poly"
  schedule = optimizer.build_schedule(cfg.optimizer, 10)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=1e-4)
  sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
  for step in range(10):
    assert float(schedule(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5)
    opt.step()
    sched.step()
  assert float(schedule(10)) == 0.0


def test_coco_step_boundaries(r50_cfg):
  schedule = optimizer.build_schedule(r50_cfg.optimizer, r50_cfg.total_steps)
  first, second = 327_778, 355_092  # SOLVER.STEPS of the authors' COCO configs
  values = [float(schedule(s)) for s in (0, first - 1, first, second - 1, second, 368_749)]
  np.testing.assert_allclose(values, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6], rtol=1e-6)


def test_bad_optimizer_config_is_named(r50_cfg):
  cfg = r50_cfg.copy_and_resolve_references()
  cfg.optimizer.schedule = "cosine"
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optimizer.build_optimizer(cfg)
  cfg.optimizer.schedule = "step"
  cfg.optimizer.step_fractions = (0.9, 0.5)
  with pytest.raises(ValueError, match="step_fractions"):
    optimizer.build_optimizer(cfg)
  cfg.optimizer.step_fractions = (0.5, 0.9)
  cfg.optimizer.learning_rate = -1.0
  with pytest.raises(ValueError, match="learning_rate"):
    optimizer.build_optimizer(cfg)
