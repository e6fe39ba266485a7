"""The assembled Mask2Former (backbone -> pixel decoder -> masked-attention decoder) and build_model."""
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from m2f_jax.models.backbone import build_backbone
from m2f_jax.models.pixel_decoder import PixelDecoder, check_widths
from m2f_jax.models.transformer_decoder import MaskedAttentionDecoder

SIZE_DIVISOR = 32  # the backbone's coarsest stride
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.remat: the stages whose blocks are rematerialised ('none', 'all' or a comma-separated list)
REMAT_STAGES = ("backbone", "pixel_decoder", "decoder")


class Mask2Former(nn.Module):
  """Mask2Former for panoptic, instance and semantic segmentation.

  Attributes:
    backbone: module mapping normalised images [B, H, W, 3] to {'res2'..'res5'}.
    pixel_decoder: module mapping those maps to (mask_features, [3 maps at 1/32, 1/16, 1/8]).
    decoder: MaskedAttentionDecoder.
    pixel_mean: RGB mean on the 0..255 scale.
    pixel_std: RGB std on the 0..255 scale.
    dtype: compute dtype of the backbone and the decoder (the pixel decoder has its own).
  """
  backbone: nn.Module
  pixel_decoder: nn.Module
  decoder: nn.Module
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  dtype: Any = jnp.float32

  def __call__(self, images: jnp.ndarray, train: bool = False,
               valid_hw: Optional[jnp.ndarray] = None) -> Dict[str, jnp.ndarray]:
    """Predicts classes and masks.

    Args:
      images: uint8 or float [B, H, W, 3] RGB on the 0..255 scale; H and W multiples of 32.
      train: training mode (batch statistics for sync BN, drop path with rngs={'dropout': key}).
      valid_hw: optional int [B, 2], each image's unpadded size inside the frame; pixels outside
        are set to 0 after normalising, as the authors pad normalised images with zeros.

    Returns:
      {'class_logits': float32 [L, B, Q, K+1], 'mask_logits': [L, B, Q, H/4, W/4]} with the mask
      logits in the compute dtype (in bfloat16 the largest output, and the criterion's gradient
      buffers like it, take half the memory; the criterion and post-processing read them in float32).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3] RGB, got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR or not height or not width:
      raise ValueError(f"image height and width must be positive multiples of {SIZE_DIVISOR}, got "
                       f"{height}x{width}; pad images bottom/right first")
    if not (jnp.issubdtype(images.dtype, jnp.floating) or images.dtype == jnp.uint8):
      raise ValueError(f"images must be uint8 or float on the 0..255 scale, got {images.dtype}")
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    if valid_hw is not None:
      rows = jnp.arange(height)[None, :, None] < valid_hw[:, 0, None, None]
      cols = jnp.arange(width)[None, None, :] < valid_hw[:, 1, None, None]
      x = jnp.where((rows & cols)[..., None], x, 0.0)
    features = self.backbone(x.astype(self.dtype), train)
    mask_features, multi_scale = self.pixel_decoder(features)
    class_logits, mask_logits = self.decoder(multi_scale, mask_features)
    return {"class_logits": class_logits.astype(jnp.float32), "mask_logits": mask_logits}


def _positive_ints(section: ml_collections.ConfigDict, where: str, keys: Sequence[str]) -> None:
  for key in keys:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")


def remat_stages(value: Any) -> frozenset:
  """The stages named by model.remat: 'none', 'all' or a comma-separated list of REMAT_STAGES."""
  if value == "none":
    return frozenset()
  if value == "all":
    return frozenset(REMAT_STAGES)
  names = [name.strip() for name in value.split(",")] if isinstance(value, str) else []
  if not names or not set(names) <= set(REMAT_STAGES):
    raise ValueError(f"model.remat must be 'none', 'all' or a comma-separated list of "
                     f"{', '.join(REMAT_STAGES)}; got {value!r}")
  return frozenset(names)


def validate_model_config(model_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value of cfg.model (the backbone checks its own)."""
  for key in ("backbone", "pixel_decoder", "decoder", "num_classes", "pixel_mean", "pixel_std", "dtype"):
    if key not in model_cfg:
      raise ValueError(f"config.model lacks {key!r}; start from configs.base.get_base_config()")
  _positive_ints(model_cfg, "model", ("num_classes",))
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}")
  for key in ("pixel_mean", "pixel_std"):
    value = tuple(model_cfg[key])
    if len(value) != 3:
      raise ValueError(f"model.{key} must hold 3 RGB values, got {value}")
  if min(model_cfg.pixel_std) <= 0:
    raise ValueError(f"model.pixel_std must be positive, got {tuple(model_cfg.pixel_std)}")
  remat_stages(model_cfg.get("remat", "none"))  # configs written before model.remat: 'none'

  pix = model_cfg.pixel_decoder
  _positive_ints(pix, "model.pixel_decoder",
                 ("conv_dim", "mask_dim", "num_layers", "num_heads", "num_points", "ffn_dim", "num_groups"))
  check_widths(pix.conv_dim, pix.num_heads, pix.num_groups, name="model.pixel_decoder.conv_dim")
  if pix.get("dtype", "float32") not in DTYPES:  # configs written before it: 'float32'
    raise ValueError(f"model.pixel_decoder.dtype must be one of {sorted(DTYPES)}, got "
                     f"{pix.dtype!r}")

  dec = model_cfg.decoder
  _positive_ints(dec, "model.decoder", ("num_queries", "hidden_dim", "num_heads", "ffn_dim"))
  if not isinstance(dec.get("num_layers"), int) or dec.num_layers < 0:
    raise ValueError(f"model.decoder.num_layers must be an integer >= 0, got {dec.get('num_layers')!r}")
  if dec.hidden_dim % dec.num_heads or dec.hidden_dim % 2:
    raise ValueError(f"model.decoder.hidden_dim={dec.hidden_dim} must be even and divisible by "
                     f"num_heads={dec.num_heads}")


def build_model(cfg: ml_collections.ConfigDict) -> Mask2Former:
  """The Mask2Former described by cfg.model (a configs/*.py config), validated."""
  if "model" not in cfg:
    raise ValueError("build_model needs the whole config (with a 'model' section), e.g. "
                     "configs/coco_panoptic_r50.py:get_config()")
  model_cfg = cfg.model
  validate_model_config(model_cfg)
  dtype = DTYPES[model_cfg.dtype]
  remat = remat_stages(model_cfg.get("remat", "none"))
  pix, dec = model_cfg.pixel_decoder, model_cfg.decoder
  return Mask2Former(
      backbone=build_backbone(model_cfg.backbone, dtype, remat="backbone" in remat),
      pixel_decoder=PixelDecoder(
          conv_dim=pix.conv_dim, mask_dim=pix.mask_dim, num_layers=pix.num_layers,
          num_heads=pix.num_heads, num_points=pix.num_points, ffn_dim=pix.ffn_dim,
          num_groups=pix.num_groups, remat="pixel_decoder" in remat,
          dtype=DTYPES[pix.get("dtype", "float32")]),
      decoder=MaskedAttentionDecoder(
          num_classes=model_cfg.num_classes, num_queries=dec.num_queries, hidden_dim=dec.hidden_dim,
          num_heads=dec.num_heads, ffn_dim=dec.ffn_dim, num_layers=dec.num_layers,
          mask_dim=pix.mask_dim, dtype=dtype, remat="decoder" in remat),
      pixel_mean=tuple(float(v) for v in model_cfg.pixel_mean),
      pixel_std=tuple(float(v) for v in model_cfg.pixel_std),
      dtype=dtype)
