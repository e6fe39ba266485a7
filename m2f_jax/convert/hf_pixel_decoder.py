"""transformers' Mask2FormerPixelDecoder tensors -> PixelDecoder params.

Takes the tensors under `model.pixel_level_module.decoder.` with that prefix stripped. transformers
5.24 keeps one naming for this module in memory and in Hub files (its conversion mapping has no
Mask2Former entry, and the generic legacy renames touch no name here), so one table serves both.
"""
import re
from typing import Any, Dict, Mapping

import numpy as np

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_ATTN_LINEARS = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")


def _linear(state: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
  """nn.Linear [out, in] -> Dense {'kernel' [in, out], 'bias'}."""
  return {"kernel": np.asarray(state[f"{prefix}.weight"]).T, "bias": np.asarray(state[f"{prefix}.bias"])}


def _conv(state: Mapping[str, np.ndarray], prefix: str, bias: bool) -> Dict[str, np.ndarray]:
  """nn.Conv2d OIHW -> Conv {'kernel' HWIO[, 'bias']}."""
  params = {"kernel": np.asarray(state[f"{prefix}.weight"]).transpose(2, 3, 1, 0)}
  if bias:
    params["bias"] = np.asarray(state[f"{prefix}.bias"])
  return params


def _norm(state: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
  """GroupNorm / LayerNorm {weight, bias} -> {'scale', 'bias'}."""
  return {"scale": np.asarray(state[f"{prefix}.weight"]), "bias": np.asarray(state[f"{prefix}.bias"])}


def _expected_names(num_layers: int) -> set:
  names = {"level_embed", "mask_projection.weight", "mask_projection.bias", "adapter_1.0.weight",
           "adapter_1.1.weight", "adapter_1.1.bias", "layer_1.0.weight", "layer_1.1.weight", "layer_1.1.bias"}
  for i in range(3):
    names.update(f"input_projections.{i}.{j}.{p}" for j in (0, 1) for p in ("weight", "bias"))
  for i in range(num_layers):
    layer = f"encoder.layers.{i}"
    for sub in [f"self_attn.{n}" for n in _ATTN_LINEARS] + ["self_attn_layer_norm", "fc1", "fc2",
                                                           "final_layer_norm"]:
      names.update((f"{layer}.{sub}.weight", f"{layer}.{sub}.bias"))
  return names


def convert_hf_pixel_decoder(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Maps transformers' pixel decoder tensors to `PixelDecoder` params.

  Args:
    state_dict: name -> array (numpy or anything np.asarray accepts), names relative to
      `model.pixel_level_module.decoder.`.

  Returns:
    The 'params' collection of `m2f_jax.models.pixel_decoder.PixelDecoder` (numpy float32).

  Raises:
    ValueError: naming every missing and unexpected tensor when the names do not match.
  """
  layer_ids = {int(m.group(1)) for m in map(_LAYER.match, state_dict) if m}
  num_layers = max(layer_ids) + 1 if layer_ids else 0
  expected = _expected_names(num_layers)
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - expected)
  if missing or unexpected or not num_layers:
    raise ValueError("transformers pixel decoder state dict does not match Mask2FormerPixelDecoder "
                     f"(names must be relative to 'model.pixel_level_module.decoder.'): "
                     f"{num_layers} encoder layers found; missing {missing}; unexpected {unexpected}")
  params: Dict[str, Any] = {"level_embed": np.asarray(state_dict["level_embed"])}
  for i in range(3):
    params[f"input_proj_{i}"] = _conv(state_dict, f"input_projections.{i}.0", bias=True)
    params[f"input_proj_{i}_norm"] = _norm(state_dict, f"input_projections.{i}.1")
  for i in range(num_layers):
    layer = f"encoder.layers.{i}"
    params[f"encoder_layer_{i}"] = {
        "self_attn": {n: _linear(state_dict, f"{layer}.self_attn.{n}") for n in _ATTN_LINEARS},
        "norm1": _norm(state_dict, f"{layer}.self_attn_layer_norm"),
        "linear1": _linear(state_dict, f"{layer}.fc1"),
        "linear2": _linear(state_dict, f"{layer}.fc2"),
        "norm2": _norm(state_dict, f"{layer}.final_layer_norm"),
    }
  params["adapter_1"] = _conv(state_dict, "adapter_1.0", bias=False)
  params["adapter_1_norm"] = _norm(state_dict, "adapter_1.1")
  params["layer_1"] = _conv(state_dict, "layer_1.0", bias=False)
  params["layer_1_norm"] = _norm(state_dict, "layer_1.1")
  params["mask_features"] = _conv(state_dict, "mask_projection", bias=True)
  return _as_float32(params)


def _as_float32(tree: Dict[str, Any]) -> Dict[str, Any]:
  return {k: _as_float32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}
