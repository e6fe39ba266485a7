"""The authors' detectron2 checkpoints (`model_final_*.pkl`) -> m2f_jax variables.

The pickle is read with an unpickler that can build nothing but numpy arrays, dtypes and plain
containers, so a hostile file raises before any of its code runs. Names (REFERENCE.md §5) are
mapped to transformers' in-memory names and converted by `m2f_jax.convert.hf`, which owns the
mapping to our parameter tree.
"""
import os
import re
from typing import Any, Dict, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2f_jax.convert import hf
from m2f_jax.convert import safe_pickle
from m2f_jax.models import build_model

DROPPED = re.compile(r"(^criterion\.|relative_position_index$|num_batches_tracked$)")


def _check_pickle_header(path: str, head: bytes) -> None:
  """Raises ValueError naming what `path` is when its first bytes are not a pickle's."""
  if head.startswith(b"PK\x03\x04"):
    raise ValueError(f"{path} is a PyTorch zip checkpoint (torch.save), not a detectron2 pickle: "
                     "pass the authors' .pkl, or call m2f_jax.convert.from_detectron2(state_dict, "
                     f"cfg) with the 'model' dict of torch.load({path!r}, weights_only=True)")
  if not head.startswith(b"\x80"):  # pickle protocol 2 and newer, which detectron2 writes
    raise ValueError(f"{path} is not a pickle file (it starts with {head!r}); --src must be the "
                     "authors' detectron2 checkpoint, e.g. model_final_94dc52.pkl")


def load_detectron2_pickle(path: str) -> Dict[str, np.ndarray]:
  """The {name: array} model weights of a detectron2 `.pkl` checkpoint, read safely."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no detectron2 checkpoint at {path}")
  with open(path, "rb") as f:
    _check_pickle_header(path, f.read(4))
    f.seek(0)
    try:
      loaded = safe_pickle.ArraysOnlyUnpickler(f, "a detectron2 model file").load()
    except safe_pickle.RefusedGlobal as e:
      raise ValueError(f"{path} is not a safe detectron2 checkpoint: {e}") from e
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
      raise ValueError(f"{path} is truncated or damaged ({type(e).__name__}: {e}); download "
                       "the checkpoint again") from e
  if isinstance(loaded, Mapping) and "model" in loaded:
    loaded = loaded["model"]
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{path}: expected a dict with a 'model' entry of name -> array, "
                     f"got {type(loaded).__name__}")
  return dict(loaded)


# ------------------------------------------------------------------ name mapping to transformers

def _rename(name: str, rules) -> Optional[str]:
  for pattern, replacement in rules:
    if re.match(pattern, name):
      return re.sub(pattern, replacement, name)
  return None


def _resnet_name(name: str) -> Optional[str]:
  """'stem.conv1.*' / 'res{2..5}.{i}.{conv1..3,shortcut}.*' -> transformers ResNetBackbone names."""
  match = re.match(r"^stem\.conv1\.(.+)$", name)
  if match:
    module, rest = "embedder.embedder", match.group(1)
  else:
    match = re.match(r"^res([2-5])\.(\d+)\.(shortcut|conv[1-3])\.(.+)$", name)
    if not match:
      return None
    stage, block, part, rest = match.groups()
    layer = "shortcut" if part == "shortcut" else f"layer.{int(part[-1]) - 1}"
    module = f"encoder.stages.{int(stage) - 2}.layers.{block}.{layer}"
  if rest == "weight":
    return f"{module}.convolution.weight"
  if rest.startswith("norm."):
    return f"{module}.normalization.{rest[len('norm.'):]}"
  return None


def resnet_entries(name: str, value: np.ndarray) -> Optional[Dict[str, np.ndarray]]:
  """detectron2 ResNet name (no 'backbone.') -> {transformers ResNetBackbone name: value}; None
  if no rule fits."""
  renamed = _resnet_name(name)
  return None if renamed is None else {renamed: value}


_SWIN_BLOCK = r"^layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_RULES = (
    (r"^patch_embed\.proj\.", "swin.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "swin.embeddings.norm."),
    (_SWIN_BLOCK + r"norm1\.", r"swin.encoder.layers.\1.blocks.\2.layernorm_before."),
    (_SWIN_BLOCK + r"norm2\.", r"swin.encoder.layers.\1.blocks.\2.layernorm_after."),
    (_SWIN_BLOCK + r"attn\.proj\.", r"swin.encoder.layers.\1.blocks.\2.attention.o_proj."),
    (_SWIN_BLOCK + r"attn\.relative_position_bias_table$",
     r"swin.encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (_SWIN_BLOCK + r"mlp\.", r"swin.encoder.layers.\1.blocks.\2.mlp."),
    (r"^layers\.(\d+)\.downsample\.", r"swin.encoder.layers.\1.downsample."),
)


def swin_entries(name: str, value: np.ndarray) -> Optional[Dict[str, np.ndarray]]:
  """Official Swin name (no 'backbone.') -> {transformers SwinBackbone name: value} (packed qkv
  split in three); None if no rule fits."""
  match = re.match(_SWIN_BLOCK + r"attn\.qkv\.(weight|bias)$", name)
  if match:  # packed q; k; v -> three projections
    prefix = f"swin.encoder.layers.{match.group(1)}.blocks.{match.group(2)}.attention"
    return {f"{prefix}.{p}_proj.{match.group(3)}": part for p, part in zip("qkv", np.split(value, 3))}
  match = re.match(r"^norm(\d)\.(weight|bias)$", name)
  if match:
    return {f"hidden_states_norms.stage{int(match.group(1)) + 1}.{match.group(2)}": value}
  renamed = _rename(name, _SWIN_RULES)
  return None if renamed is None else {renamed: value}


_PIXEL_DECODER_RULES = (
    (r"^input_proj\.", "input_projections."),
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"encoder.layers.\1.fc1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"encoder.layers.\1.fc2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.final_layer_norm."),
    (r"^mask_features\.", "mask_projection."),
    (r"^(adapter|layer)_(\d+)\.weight$", r"\1_\2.0.weight"),
    (r"^(adapter|layer)_(\d+)\.norm\.", r"\1_\2.1."),
)

_PREDICTOR_RULES = (
    (r"^transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.",
     r"decoder.layers.\1.self_attn.out_proj."),
    (r"^transformer_self_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    (r"^transformer_cross_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.cross_attn_layer_norm."),
    (r"^transformer_ffn_layers\.(\d+)\.linear1\.", r"decoder.layers.\1.fc1."),
    (r"^transformer_ffn_layers\.(\d+)\.linear2\.", r"decoder.layers.\1.fc2."),
    (r"^transformer_ffn_layers\.(\d+)\.norm\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^decoder_norm\.", "decoder.layernorm."),
    (r"^query_feat\.", "queries_features."),
    (r"^query_embed\.", "queries_embedder."),
    (r"^level_embed\.", "level_embed."),
    (r"^mask_embed\.layers\.(\d+)\.", r"decoder.mask_predictor.mask_embedder.\1.0."),
    (r"^input_proj\.(\d+)\.", r"input_projections.\1."),
)


def _predictor_entries(name: str, value: np.ndarray) -> Optional[Dict[str, np.ndarray]]:
  match = re.match(r"^transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", name)
  if match:  # nn.MultiheadAttention's packed q; k; v -> transformers' separate projections
    prefix = f"{hf.TRANSFORMER_PREFIX}decoder.layers.{match.group(1)}.self_attn"
    return {f"{prefix}.{p}_proj.{match.group(2)}": part for p, part in zip("qkv", np.split(value, 3))}
  if name.startswith("class_embed."):
    return {hf.CLASS_PREFIX + name[len("class_embed."):]: value}
  renamed = _rename(name, _PREDICTOR_RULES)
  return None if renamed is None else {hf.TRANSFORMER_PREFIX + renamed: value}


def detectron2_to_hf_names(state_dict: Mapping[str, np.ndarray], backbone: str) -> Dict[str, np.ndarray]:
  """Renames the authors' tensors to transformers' in-memory Mask2Former names.

  Args:
    state_dict: detectron2 name -> array.
    backbone: 'resnet' or 'swin'.

  Raises:
    ValueError: naming the tensors that fit no rule.
  """
  backbone_entries = {"resnet": resnet_entries, "swin": swin_entries}.get(backbone)
  if backbone_entries is None:
    raise ValueError(f"backbone must be 'resnet' or 'swin', got {backbone!r}")
  out, unknown = {}, []
  for name, value in state_dict.items():
    if DROPPED.search(name):
      continue
    entries = None
    if name.startswith("backbone."):
      entries = backbone_entries(name[len("backbone."):], value)
      entries = entries and {hf.BACKBONE_PREFIX + k: v for k, v in entries.items()}
    elif name.startswith("sem_seg_head.pixel_decoder."):
      renamed = _rename(name[len("sem_seg_head.pixel_decoder."):], _PIXEL_DECODER_RULES)
      entries = renamed and {hf.PIXEL_DECODER_PREFIX + renamed: value}
    elif name.startswith("sem_seg_head.predictor."):
      entries = _predictor_entries(name[len("sem_seg_head.predictor."):], value)
    if entries is None:
      unknown.append(name)
    else:
      out.update(entries)
  if unknown:
    raise ValueError(f"{len(unknown)} tensor names of the detectron2 checkpoint fit no known "
                     f"Mask2Former ({backbone}) layout: {unknown[:10]}")
  return out


def _numeric(name: str, value: Any) -> np.ndarray:
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"detectron2 tensor {name} has non-numeric dtype {array.dtype}")
  return array


def _check_against_model(cfg: ml_collections.ConfigDict, variables: dict) -> None:
  """Raises when the converted tree does not fit `build_model(cfg)` exactly."""
  model = build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
  expected = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(variables)}
  problems = [f"  {k}: checkpoint {got.get(k)} vs config {expected.get(k)}"
              for k in sorted(expected.keys() | got.keys()) if got.get(k) != expected.get(k)]
  if problems:
    raise ValueError("the detectron2 checkpoint does not fit the model of this config:\n"
                     + "\n".join(problems[:20]))


def from_detectron2(path_or_state_dict: Union[str, Mapping[str, Any]],
                    cfg: ml_collections.ConfigDict) -> dict:
  """Variables for `build_model(cfg)` from the authors' checkpoint.

  Args:
    path_or_state_dict: a `model_final_*.pkl` path, or its {name: array} 'model' dict.
    cfg: the config of the recipe the checkpoint was trained with (configs/*.py).

  Returns:
    {'params': ..., 'batch_stats': ...}.
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    state_dict = load_detectron2_pickle(os.fspath(path_or_state_dict))
  else:
    state_dict = dict(path_or_state_dict)
  state_dict = {name: _numeric(name, value) for name, value in state_dict.items()}
  backbone_cfg = cfg.model.backbone
  hf_names = detectron2_to_hf_names(state_dict, backbone_cfg.name)
  _, variables = hf.convert_hf_state_dict(cfg.model, hf.hf_backbone_config(backbone_cfg), hf_names,
                                          backbone_norm=backbone_cfg.get("norm", "frozen_bn"))
  _check_against_model(cfg, variables)
  return variables
