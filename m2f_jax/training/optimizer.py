"""AdamW with the authors' parameter groups, full-model gradient clipping and lr schedules.

Parameter groups follow the authors' `build_optimizer` (train_net.py), matched here by the path of
each leaf in the param tree ('backbone/res2_0/conv1/kernel'):
- lr x `backbone_multiplier` for everything under the top-level 'backbone'.
- No weight decay on normalisation layers (any param dict holding 'scale' and no 'kernel':
  LayerNorm, GroupNorm, BatchNorm) and on the paths matched by `optimizer.no_decay_patterns` (query features,
  query positions, level embeddings, Swin relative-position tables). Biases do get weight decay.
- Frozen BatchNorm ('frozen_bn' ResNet backbones): the backbone's norm params never change; their
  gradients are zeroed before clipping, as the authors keep them as buffers outside the optimiser.
"""
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN, BACKBONE, DEFAULT = "frozen", "backbone", "default"

# Authors' choice: nn.Embedding (query_feat, query_embed, the decoder's level_embed) and Swin's
# relative_position_bias_table get no decay; the pixel decoder's level_embed is a plain
# nn.Parameter there and does get decay.
DEFAULT_NO_DECAY_PATTERNS = (
    r"(^|/)query_feat(/|$)",
    r"(^|/)query_embed(/|$)",
    r"^decoder/(.*/)?level_embed(/|$)",
    r"(^|/)relative_position_bias_table(/|$)",
)


def _path_str(path: Sequence[Any]) -> str:
  """'a/b/c' from a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _norm_dicts(tree: Any) -> set:
  """Paths ('a/b') of the dicts that hold a norm layer's params: 'scale' and no 'kernel'."""
  found = set()

  def visit(node, prefix):
    if hasattr(node, "keys"):
      keys = set(node.keys())
      if "scale" in keys and "kernel" not in keys:
        found.add(prefix)
      for k in keys:
        visit(node[k], f"{prefix}/{k}" if prefix else str(k))

  visit(tree, "")
  return found


def _frozen_bn(model_cfg: ml_collections.ConfigDict) -> bool:
  bb = model_cfg.backbone
  return bb.name == "resnet" and bb.get("norm", "frozen_bn") == "frozen_bn"


def param_labels(params: Any, cfg: ml_collections.ConfigDict) -> Any:
  """Per-leaf learning-rate group: 'frozen', 'backbone' or 'default' (same structure as params)."""
  norms = _norm_dicts(params)
  frozen = _frozen_bn(cfg.model)

  def label(path, _):
    name = _path_str(path)
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if not name.startswith("backbone/"):
      return DEFAULT
    if frozen and parent in norms:
      return FROZEN
    return BACKBONE

  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any, cfg: ml_collections.ConfigDict) -> Any:
  """Per-leaf bool: True where weight decay applies (same structure as params)."""
  norms = _norm_dicts(params)
  patterns = cfg.optimizer.get("no_decay_patterns", DEFAULT_NO_DECAY_PATTERNS)
  patterns = [re.compile(p) for p in patterns]

  def decays(path, _):
    name = _path_str(path)
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent in norms:
      return False
    return not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def build_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per step (no warm-up).

  'step': lr * step_factor ** (number of boundaries round(f * total_steps) <= step).
  'poly': lr * (1 - step / total_steps) ** poly_power.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  base = float(opt_cfg.learning_rate)
  if opt_cfg.schedule == "step":
    fractions = tuple(opt_cfg.step_fractions)
    if any(not 0.0 < f <= 1.0 for f in fractions) or list(fractions) != sorted(fractions):
      raise ValueError(f"optimizer.step_fractions must be increasing in (0, 1], got {fractions}")
    boundaries = jnp.asarray([round(f * total_steps) for f in fractions], jnp.int32)
    factor = float(opt_cfg.step_factor)

    def step_schedule(step):
      passed = jnp.sum(jnp.asarray(step, jnp.int32) >= boundaries)
      return base * factor ** passed.astype(jnp.float32)

    return step_schedule
  if opt_cfg.schedule == "poly":
    power = float(opt_cfg.poly_power)

    def poly_schedule(step):
      progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
      return base * (1.0 - progress) ** power

    return poly_schedule
  raise ValueError(f"optimizer.schedule must be 'step' or 'poly', got {opt_cfg.schedule!r}")


def build_optimizer(cfg: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """The authors' optimiser for `cfg` (uses cfg.optimizer, cfg.model.backbone, cfg.total_steps).

  Returns:
    (tx, schedule): the optax transformation (call `tx.update(grads, opt_state, params)`; params are
    required for weight decay) and the base learning rate as a function of the step.
  """
  opt = cfg.optimizer
  for key in ("learning_rate", "b1", "b2", "eps", "weight_decay", "clip_norm",
              "backbone_multiplier"):
    if opt[key] is None or opt[key] < 0:
      raise ValueError(f"optimizer.{key} must be a non-negative number, got {opt[key]!r}")
  if not 0.0 <= opt.b1 < 1.0 or not 0.0 <= opt.b2 < 1.0:
    raise ValueError(f"optimizer.b1 and b2 must be in [0, 1), got {opt.b1}, {opt.b2}")
  schedule = build_schedule(opt, cfg.total_steps)

  def frozen_mask(tree):
    return jax.tree.map(lambda lab: lab == FROZEN, param_labels(tree, cfg))

  def decay_and_trainable(tree):
    return jax.tree.map(lambda d, f: d and not f, decay_mask(tree, cfg), frozen_mask(tree))

  steps = []
  if _frozen_bn(cfg.model):
    steps.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if opt.clip_norm > 0:
    steps.append(optax.clip_by_global_norm(opt.clip_norm))
  steps += [
      optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
      optax.add_decayed_weights(opt.weight_decay, mask=decay_and_trainable),
      optax.scale_by_learning_rate(schedule),
      optax.multi_transform(
          {FROZEN: optax.set_to_zero(), BACKBONE: optax.scale(opt.backbone_multiplier),
           DEFAULT: optax.identity()},
          lambda tree: param_labels(tree, cfg)),
  ]
  return optax.chain(*steps), schedule
