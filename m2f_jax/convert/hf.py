"""transformers' Mask2FormerForUniversalSegmentation checkpoints -> m2f_jax config and variables.

`from_hf(hf_config, state_dict)` takes `Mask2FormerConfig.to_dict()` (or a Hub config.json) and a
state dict with transformers 5.x in-memory names or Hub `model.safetensors` names. The backbone
and the pixel decoder have their own converters; this file owns the transformer decoder, the
class head and the routing between them.
"""
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from configs import base
from m2f_jax.convert.hf_backbone import convert_hf_backbone
from m2f_jax.convert.hf_pixel_decoder import convert_hf_pixel_decoder

BACKBONE_PREFIX = "model.pixel_level_module.encoder."
PIXEL_DECODER_PREFIX = "model.pixel_level_module.decoder."
TRANSFORMER_PREFIX = "model.transformer_module."
CLASS_PREFIX = "class_predictor."
DROPPED_PREFIXES = ("criterion.",)  # loss buffers, not model weights


class StateDictReader:
  """Hands out state-dict entries once each and reports what was missing or left over."""

  def __init__(self, state_dict: Mapping[str, Any], source: str):
    self._entries = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    self._source = source
    self._missing = []

  def take(self, name: str, shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
    """The array stored under `name` (checked against `shape` when given)."""
    if name not in self._entries:
      self._missing.append(name)
      return np.zeros(shape or (), np.float32)
    value = self._entries.pop(name)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"{self._source}: {name} has shape {tuple(value.shape)}, the config expects "
                       f"{tuple(shape)}; the checkpoint does not match its config")
    return value

  def linear(self, prefix: str, in_dim: int, out_dim: int) -> Dict[str, np.ndarray]:
    """A PyTorch Linear [out, in] -> Flax Dense {'kernel' [in, out], 'bias' [out]}."""
    return {"kernel": self.take(prefix + "weight", (out_dim, in_dim)).T,
            "bias": self.take(prefix + "bias", (out_dim,))}

  def layer_norm(self, prefix: str, dim: int) -> Dict[str, np.ndarray]:
    return {"scale": self.take(prefix + "weight", (dim,)), "bias": self.take(prefix + "bias", (dim,))}

  def finish(self) -> None:
    """Raises if any expected name was missing or any entry was never used."""
    problems = [f"  missing: {n}" for n in self._missing[:20]]
    problems += [f"  unexpected: {n} {tuple(v.shape)}" for n, v in sorted(self._entries.items())[:20]]
    if problems:
      raise ValueError(f"{self._source} does not match the expected Mask2Former layout "
                       f"({len(self._missing)} missing, {len(self._entries)} unexpected):\n"
                       + "\n".join(problems))


def convert_hf_transformer_decoder(state_dict: Mapping[str, Any], decoder_cfg: ml_collections.ConfigDict,
                                   num_classes: int, in_channels: int, mask_dim: int) -> dict:
  """Params of `MaskedAttentionDecoder` from transformers names.

  Args:
    state_dict: entries under `model.transformer_module.` (prefix removed) plus the class head
      as `class_predictor.weight` / `class_predictor.bias`.
    decoder_cfg: cfg.model.decoder (num_queries, hidden_dim, num_heads, ffn_dim, num_layers).
    num_classes: K real classes.
    in_channels: channels of the pixel decoder's multi-scale maps.
    mask_dim: channels of mask_features.
  """
  reader = StateDictReader(state_dict, "transformer decoder state dict")
  d, q = decoder_cfg.hidden_dim, decoder_cfg.num_queries
  params = {
      "query_feat": reader.take("queries_features.weight", (q, d)),
      "query_embed": reader.take("queries_embedder.weight", (q, d)),
      "level_embed": reader.take("level_embed.weight", (3, d)),
  }
  if in_channels != d:
    for level in range(3):
      w = reader.take(f"input_projections.{level}.weight", (d, in_channels, 1, 1))
      params[f"input_proj_{level}"] = {"kernel": w[:, :, 0, 0].T,
                                       "bias": reader.take(f"input_projections.{level}.bias", (d,))}
  for i in range(decoder_cfg.num_layers):
    p = f"decoder.layers.{i}."
    packed_w = reader.take(p + "cross_attn.in_proj_weight", (3 * d, d))
    packed_b = reader.take(p + "cross_attn.in_proj_bias", (3 * d,))
    cross = {name: {"kernel": packed_w[j * d:(j + 1) * d].T, "bias": packed_b[j * d:(j + 1) * d]}
             for j, name in enumerate(("query", "key", "value"))}
    cross["out"] = reader.linear(p + "cross_attn.out_proj.", d, d)
    self_attn = {name: reader.linear(f"{p}self_attn.{hf}_proj.", d, d)
                 for name, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out"))}
    params[f"layers_{i}"] = {
        "cross_attn": cross,
        "cross_attn_norm": reader.layer_norm(p + "cross_attn_layer_norm.", d),
        "self_attn": self_attn,
        "self_attn_norm": reader.layer_norm(p + "self_attn_layer_norm.", d),
        "ffn_in": reader.linear(p + "fc1.", d, decoder_cfg.ffn_dim),
        "ffn_out": reader.linear(p + "fc2.", decoder_cfg.ffn_dim, d),
        "ffn_norm": reader.layer_norm(p + "final_layer_norm.", d),
    }
  head = {"decoder_norm": reader.layer_norm("decoder.layernorm.", d),
          "class_embed": reader.linear(CLASS_PREFIX, d, num_classes + 1)}
  for j, width in enumerate((d, d, mask_dim)):
    head[f"mask_embed_{j}"] = reader.linear(f"decoder.mask_predictor.mask_embedder.{j}.0.", d, width)
  params["head"] = head
  reader.finish()
  return params


def config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """configs/base.py's base config with the model section (backbone aside) taken from hf_config."""
  unsupported = {
      "activation_function": (hf_config.get("activation_function", "relu"), "relu"),
      "pre_norm": (hf_config.get("pre_norm", False), False),
      "common_stride": (hf_config.get("common_stride", 4), 4),
      "feature_strides": (list(hf_config.get("feature_strides", [4, 8, 16, 32])), [4, 8, 16, 32]),
  }
  for key, (value, supported) in unsupported.items():
    if value != supported:
      raise ValueError(f"Mask2Former config {key}={value!r} is not supported (the authors' model has "
                       f"{supported!r})")
  required = ("feature_size", "mask_feature_size", "hidden_dim", "encoder_layers", "encoder_feedforward_dim",
              "num_attention_heads", "num_queries", "dim_feedforward", "decoder_layers")
  missing = [key for key in required if not isinstance(hf_config.get(key), int)]
  if missing:
    raise ValueError(f"Mask2Former config lacks integer values for {missing}")
  if hf_config.get("enforce_input_projection") and hf_config["feature_size"] == hf_config["hidden_dim"]:
    raise ValueError("Mask2Former config enforce_input_projection=True with feature_size == hidden_dim "
                     "is not supported: the decoder projects its inputs only when the widths differ")
  if hf_config["decoder_layers"] < 1:
    raise ValueError(f"decoder_layers must be >= 1 (it counts predictions), got "
                     f"{hf_config.get('decoder_layers')}")
  if hf_config.get("dropout", 0.0):
    logging.warning("ignoring Mask2Former config dropout=%s: the authors' model has no dropout "
                    "(transformers also uses it as layer-drop)", hf_config["dropout"])
  id2label = hf_config.get("id2label")
  if not id2label:
    raise ValueError("Mask2Former config has no id2label, so the number of classes is unknown")

  cfg = base.get_base_config()
  model = cfg.model
  model.num_classes = len(id2label)
  model.pixel_decoder.update(
      conv_dim=hf_config["feature_size"], mask_dim=hf_config["mask_feature_size"],
      num_layers=hf_config["encoder_layers"], num_heads=hf_config["num_attention_heads"],
      num_points=4, ffn_dim=hf_config["encoder_feedforward_dim"], num_groups=32)
  model.decoder.update(
      num_queries=hf_config["num_queries"], hidden_dim=hf_config["hidden_dim"],
      num_heads=hf_config["num_attention_heads"], ffn_dim=hf_config["dim_feedforward"],
      num_layers=hf_config["decoder_layers"] - 1)
  return cfg


def hf_backbone_config(backbone_cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The transformers backbone config (as a dict with model_type) describing cfg.model.backbone."""
  stages = ["stage1", "stage2", "stage3", "stage4"]
  if backbone_cfg.name == "resnet":
    return dict(model_type="resnet", layer_type="bottleneck", hidden_act="relu",
                downsample_in_bottleneck=False, downsample_in_first_stage=False, num_channels=3,
                out_features=stages, depths=list(backbone_cfg.stage_blocks),
                hidden_sizes=[4 * backbone_cfg.base_width * 2**i for i in range(4)],
                embedding_size=backbone_cfg.stem_width)
  if backbone_cfg.name == "swin":
    return dict(model_type="swin", hidden_act="gelu", qkv_bias=True, use_absolute_embeddings=False,
                num_channels=3, out_features=stages, layer_norm_eps=1e-5,
                embed_dim=backbone_cfg.embed_dim, depths=list(backbone_cfg.depths),
                num_heads=list(backbone_cfg.num_heads), window_size=backbone_cfg.window_size,
                patch_size=backbone_cfg.patch_size, mlp_ratio=backbone_cfg.mlp_ratio,
                drop_path_rate=backbone_cfg.drop_path_rate)
  raise ValueError(f"model.backbone.name must be 'resnet' or 'swin', got {backbone_cfg.name!r}")


def hf_config_from_cfg(cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Keyword arguments of a transformers Mask2FormerConfig for the model of `cfg` (inverse of from_hf).

  transformers' Mask2Former shares one head count between the pixel decoder and the decoder and
  fixes 4 sampling points and 32 GroupNorm groups; configs outside that raise ValueError.
  """
  model = cfg.model
  pix, dec = model.pixel_decoder, model.decoder
  if pix.num_heads != dec.num_heads or pix.num_points != 4 or pix.num_groups != 32:
    raise ValueError("transformers' Mask2Former needs pixel_decoder.num_heads == decoder.num_heads, "
                     f"num_points 4 and num_groups 32; got {pix.num_heads}/{dec.num_heads}, "
                     f"{pix.num_points}, {pix.num_groups}")
  return dict(
      backbone_config=hf_backbone_config(model.backbone),
      num_labels=model.num_classes, num_queries=dec.num_queries, decoder_layers=dec.num_layers + 1,
      feature_size=pix.conv_dim, mask_feature_size=pix.mask_dim, hidden_dim=dec.hidden_dim,
      encoder_feedforward_dim=pix.ffn_dim, dim_feedforward=dec.ffn_dim, encoder_layers=pix.num_layers,
      num_attention_heads=dec.num_heads, dropout=0.0, pre_norm=False, common_stride=4,
      enforce_input_projection=False)


def convert_hf_state_dict(model_cfg: ml_collections.ConfigDict, backbone_hf_config: Mapping[str, Any],
                          state_dict: Mapping[str, Any], backbone_norm: str = "frozen_bn"
                          ) -> Tuple[ml_collections.ConfigDict, dict]:
  """Variables of the model described by `model_cfg` from a state dict with transformers names.

  Args:
    model_cfg: cfg.model; its pixel_decoder and decoder sections give the expected shapes.
    backbone_hf_config: the transformers backbone config as a dict (ResNetConfig or SwinConfig).
    state_dict: full transformers names (in-memory or Hub) -> arrays or torch tensors.
    backbone_norm: ResNet norm of the result, 'frozen_bn' or 'sync_bn' (same tensors).

  Returns:
    (backbone config, {'params', 'batch_stats'}).
  """
  parts = {BACKBONE_PREFIX: {}, PIXEL_DECODER_PREFIX: {}, TRANSFORMER_PREFIX: {}}
  unknown = []
  for name, value in state_dict.items():
    prefix = next((p for p in parts if name.startswith(p)), None)
    if prefix is not None:
      parts[prefix][name[len(prefix):]] = _to_numpy(value)
    elif name.startswith(CLASS_PREFIX):
      parts[TRANSFORMER_PREFIX][name] = _to_numpy(value)
    elif not name.startswith(DROPPED_PREFIXES):
      unknown.append(name)
  if unknown:
    raise ValueError(f"unknown names in the Mask2Former state dict: {unknown[:10]}")

  backbone_cfg, backbone_vars = convert_hf_backbone(dict(backbone_hf_config), parts[BACKBONE_PREFIX],
                                                    norm=backbone_norm)
  decoder = convert_hf_transformer_decoder(
      parts[TRANSFORMER_PREFIX], model_cfg.decoder, model_cfg.num_classes,
      in_channels=model_cfg.pixel_decoder.conv_dim, mask_dim=model_cfg.pixel_decoder.mask_dim)
  variables = {
      "params": {"backbone": backbone_vars["params"],
                 "pixel_decoder": convert_hf_pixel_decoder(parts[PIXEL_DECODER_PREFIX]),
                 "decoder": decoder},
      "batch_stats": {},
  }
  if backbone_vars.get("batch_stats"):
    variables["batch_stats"]["backbone"] = backbone_vars["batch_stats"]
  return backbone_cfg, variables


def from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any]
            ) -> Tuple[ml_collections.ConfigDict, dict]:
  """Converts a transformers Mask2Former checkpoint.

  Args:
    hf_config: `Mask2FormerConfig.to_dict()` or the Hub's config.json contents.
    state_dict: name -> array (torch tensors or numpy), in-memory or Hub safetensors names.

  Returns:
    (cfg, variables): configs/base.py's config with the model section filled from hf_config,
    and {'params', 'batch_stats'} for `build_model(cfg)`.
  """
  if hf_config.get("model_type", "mask2former") != "mask2former":
    raise ValueError(f"expected a Mask2Former config, got model_type={hf_config.get('model_type')!r}")
  if not isinstance(hf_config.get("backbone_config"), Mapping):
    raise ValueError("Mask2Former config needs an explicit backbone_config (a named Hub backbone "
                     "cannot be resolved offline)")
  cfg = config_from_hf(hf_config)
  cfg.model.backbone, variables = convert_hf_state_dict(cfg.model, hf_config["backbone_config"],
                                                        state_dict)
  return cfg, variables


def load_hf_directory(directory: str):
  """(config dict, {name: numpy array}) of a Hub-format directory (config.json + safetensors)."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: expected a Hub-format directory with "
                            "config.json and model.safetensors")
  with open(config_path) as f:
    hf_config = json.load(f)
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    with open(index_path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, "model.safetensors")):
    shards = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"no model.safetensors in {directory} (only safetensors weights are "
                            "read; convert a pytorch_model.bin with save_pretrained first)")
  state_dict = {}
  for shard in shards:
    path = os.path.join(directory, shard)
    try:
      state_dict.update(load_file(path))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
      raise ValueError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                       "download it again") from e
  return hf_config, state_dict


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype) or array-like -> numpy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  return np.asarray(value)
