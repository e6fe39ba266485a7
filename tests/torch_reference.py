"""transformers' PyTorch Mask2Former, the executable reference of the parity tests.

Builds small models offline with every parameter and every norm statistic randomised
(default inits hide transposition bugs) and runs them on CPU in float32.
"""
import os

import numpy as np
import torch
import transformers

torch.set_num_threads(2)


def hf_config(backbone: str = "swin", num_labels: int = 5, num_queries: int = 7,
              decoder_layers: int = 4, width: int = 64, encoder_layers: int = 2,
              **overrides) -> "transformers.Mask2FormerConfig":
  """A small Mask2FormerConfig; `decoder_layers=N` gives N-1 decoder layers (N predictions)."""
  if backbone == "swin":
    bb = transformers.SwinConfig(
        embed_dim=32, depths=[1, 2, 2, 1], num_heads=[1, 2, 4, 8], window_size=4,
        image_size=64, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
  elif backbone == "resnet":
    bb = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
        layer_type="bottleneck", downsample_in_bottleneck=False,
        out_features=["stage1", "stage2", "stage3", "stage4"])
  else:
    raise ValueError(backbone)
  kw = dict(backbone_config=bb, num_labels=num_labels, num_queries=num_queries,
            decoder_layers=decoder_layers, feature_size=width, mask_feature_size=width,
            hidden_dim=width, encoder_feedforward_dim=2 * width, dim_feedforward=3 * width,
            encoder_layers=encoder_layers, num_attention_heads=4, dropout=0.0)
  kw.update(overrides)
  return transformers.Mask2FormerConfig(**kw)


def randomise_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
  """Overwrites every parameter and float buffer with random values (variances kept positive)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
      if not p.is_floating_point():
        continue
      r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if name.endswith("running_var"):
        p.copy_(0.5 + r.abs())
      elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) or "layernorm" in name:
        p.copy_(1.0 + scale * r)
      else:
        p.copy_(scale * r)


def random_model(config, seed: int = 0) -> "transformers.Mask2FormerForUniversalSegmentation":
  """A Mask2FormerForUniversalSegmentation in eval mode with all weights randomised."""
  torch.manual_seed(seed)
  model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
  randomise_(model, seed)
  return model


def state_dict_numpy(model: torch.nn.Module) -> dict:
  """The model's in-memory state dict as float32 numpy arrays."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def normalise(images_uint8: np.ndarray) -> torch.Tensor:
  """[B,H,W,3] 0..255 -> [B,3,H,W] normalised with the authors' mean and std."""
  mean = np.array([123.675, 116.28, 103.53], np.float32)
  std = np.array([58.395, 57.12, 57.375], np.float32)
  x = (images_uint8.astype(np.float32) - mean) / std
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


# The authors' R50 COCO panoptic tensor names and shapes: a copy of the project's shared reference
# file (shared/detectron2_r50_coco_panoptic_keys.txt), so that a bare clone runs every test.
AUTHORS_R50_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                "detectron2_r50_coco_panoptic_keys.txt")
