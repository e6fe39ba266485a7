"""Builds the backbone module named by a `configs.base.resnet_backbone` / `swin_backbone` config."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from m2f_jax.models.resnet import NORMS, ResNet
from m2f_jax.models.swin import Swin

BACKBONES = ("resnet", "swin")


def _require(cfg: ml_collections.ConfigDict, keys) -> None:
  missing = [k for k in keys if k not in cfg]
  if missing:
    raise ValueError(f"model.backbone config ({cfg.get('name')!r}) lacks keys {missing}; "
                     "start from configs.base.resnet_backbone() or swin_backbone()")


def build_backbone(backbone_cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32,
                   remat: bool = False) -> nn.Module:
  """Returns an unbound ResNet or Swin module; both map normalised images [B, H, W, 3] to
  {'res2', 'res3', 'res4', 'res5'} feature maps at strides 4, 8, 16, 32 ([B, h, w, C]).

  `dtype` (a dtype or its name, e.g. cfg.model.dtype) is the compute dtype; `remat`
  rematerialises each block (model.remat).
  """
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"backbone compute dtype {dtype!r} is not a dtype name") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError("backbone compute dtype must be a float type such as 'float32' or 'bfloat16', "
                     f"got {dtype}")
  name = backbone_cfg.get("name")
  if name == "resnet":
    _require(backbone_cfg, ("stage_blocks", "stem_width", "base_width", "norm", "norm_eps"))
    blocks = tuple(int(b) for b in backbone_cfg.stage_blocks)
    if len(blocks) != 4 or min(blocks) < 1:
      raise ValueError(f"model.backbone.stage_blocks must be 4 positive counts, got {blocks}")
    if backbone_cfg.norm not in NORMS:
      raise ValueError(f"model.backbone.norm must be one of {NORMS}, got {backbone_cfg.norm!r}")
    return ResNet(stage_blocks=blocks, stem_width=int(backbone_cfg.stem_width),
                  base_width=int(backbone_cfg.base_width), norm=backbone_cfg.norm,
                  norm_eps=float(backbone_cfg.norm_eps), dtype=dtype, remat=remat)
  if name == "swin":
    _require(backbone_cfg, ("embed_dim", "depths", "num_heads", "window_size", "patch_size",
                            "mlp_ratio", "drop_path_rate"))
    if not 0.0 <= backbone_cfg.drop_path_rate < 1.0:
      raise ValueError("model.backbone.drop_path_rate must be in [0, 1), got "
                       f"{backbone_cfg.drop_path_rate}")
    if backbone_cfg.window_size < 1 or backbone_cfg.patch_size < 1:
      raise ValueError(f"model.backbone window_size and patch_size must be positive, got "
                       f"{backbone_cfg.window_size} and {backbone_cfg.patch_size}")
    return Swin(embed_dim=int(backbone_cfg.embed_dim), depths=tuple(int(d) for d in backbone_cfg.depths),
                num_heads=tuple(int(h) for h in backbone_cfg.num_heads),
                window_size=int(backbone_cfg.window_size), patch_size=int(backbone_cfg.patch_size),
                mlp_ratio=float(backbone_cfg.mlp_ratio),
                drop_path_rate=float(backbone_cfg.drop_path_rate), dtype=dtype, remat=remat)
  raise ValueError(f"model.backbone.name must be one of {BACKBONES}, got {name!r}")
