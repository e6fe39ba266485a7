"""ImageNet-pretrained weights -> the backbone variables of a fresh model (`model.backbone.init_from`).

Name layouts, told from the tensor names (the container is told from the bytes, `weight_files`):
  detectron2 ResNet (`R-50.pkl`, `R-101.pkl`): stem.conv1[.norm].*, res{2..5}.{i}.{conv1..3,
    shortcut}[.norm].*; its classification head is stem.fc.* (detectron2's conversion prefixes it).
  torchvision / timm ResNet: conv1, bn1, layer{1..4}.{i}.{conv,bn}{1..3}, .downsample.{0,1}; head fc.
  official Swin (release `.pth`, the authors' `.pkl`): patch_embed, layers.{s}.blocks.{j}.{norm1,
    attn.{qkv, proj, relative_position_bias_table}, norm2, mlp.fc1, mlp.fc2}, layers.{s}.downsample
    after stage s < 3; head.* and the final norm.* are the classifier's.
  timm Swin: as official, but layers.{s}.downsample opens stage s > 0; head.fc.* and norm.*.
  transformers ResNet / Swin (Hub directory or its safetensors): [resnet.]embedder..., [swin.]
    embeddings..., Hub or in-memory Swin names; classifier.* and Swin's final layernorm.*.
Each layout is renamed to transformers' in-memory names (`detectron2.resnet_entries` /
`swin_entries` own those rules), and `hf_backbone` places them in our parameter tree. Buffers
(num_batches_tracked, relative_position_index, attn_mask) are ignored; relative-position tables of
another window are resized bicubically, as the official Swin loader does. Swin's per-stage output
norms (norm0..norm3) are not part of any ImageNet checkpoint and keep their fresh values.
"""
import dataclasses
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from absl import logging
import jax
import ml_collections
import numpy as np

from m2f_jax.convert import detectron2
from m2f_jax.convert import hf_backbone
from m2f_jax.convert import relative_position_resize
from m2f_jax.convert import weight_files

HF_STAGES = ["stage1", "stage2", "stage3", "stage4"]
TABLE_SUFFIX = "relative_position_bias_table"
# Per-stage output norms of the authors' D2 Swin: absent from ImageNet checkpoints.
FRESH_SWIN_NORMS = re.compile(r"^hidden_states_norms\.stage[1-4]\.(weight|bias)$")
ToHf = Callable[[str, np.ndarray], Optional[Dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family of tensor names.

  Attributes:
    name: shown in logs and errors.
    backbone: 'resnet' or 'swin'.
    head: names of the classification head (dropped and reported).
    buffers: names of non-parameter buffers (ignored).
    to_hf: (name, array) -> {transformers in-memory name: array}, None when no rule fits.
  """
  name: str
  backbone: str
  head: re.Pattern
  buffers: re.Pattern
  to_hf: ToHf


def _torchvision_to_detectron2(name: str) -> str:
  """torchvision ResNet names -> detectron2's (its convert-torchvision-to-d2 renaming)."""
  match = re.match(r"^layer([1-4])\.(.+)$", name)
  name = f"res{int(match.group(1)) + 1}.{match.group(2)}" if match else f"stem.{name}"
  name = re.sub(r"(^|\.)bn([1-3])\.", r"\1conv\2.norm.", name)
  return name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def _timm_swin_entries(name: str, value: np.ndarray) -> Optional[Dict[str, np.ndarray]]:
  """timm puts a stage's patch merging at its start: layers.{s}.downsample -> official layers.{s-1}."""
  match = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", name)
  if match:
    stage = int(match.group(1))
    if stage == 0:
      return None
    name = f"layers.{stage - 1}.downsample.{match.group(2)}"
  return detectron2.swin_entries(name, value)


def _hf_resnet_entries(name: str, value: np.ndarray) -> Dict[str, np.ndarray]:
  return {re.sub(r"^resnet\.", "", name): value}


def _hf_swin_entries(name: str, value: np.ndarray) -> Dict[str, np.ndarray]:
  return hf_backbone.normalise_swin_names({name: value})


_RESNET_BUFFERS = re.compile(r"num_batches_tracked$")
_SWIN_BUFFERS = re.compile(r"(relative_position_index|attn_mask)$")
LAYOUTS = {
    "detectron2_resnet": Layout("detectron2 ResNet (R-50.pkl)", "resnet", re.compile(r"^(stem\.)?fc\."),
                                _RESNET_BUFFERS, detectron2.resnet_entries),
    "torchvision_resnet": Layout("torchvision/timm ResNet", "resnet", re.compile(r"^fc\."), _RESNET_BUFFERS,
                                 lambda n, v: detectron2.resnet_entries(_torchvision_to_detectron2(n), v)),
    "official_swin": Layout("official Swin", "swin", re.compile(r"^(head|norm)\."), _SWIN_BUFFERS,
                            detectron2.swin_entries),
    "timm_swin": Layout("timm Swin", "swin", re.compile(r"^(head|norm)\."), _SWIN_BUFFERS, _timm_swin_entries),
    "hf_resnet": Layout("transformers ResNet", "resnet", re.compile(r"^classifier\."), _RESNET_BUFFERS,
                        _hf_resnet_entries),
    "hf_swin": Layout("transformers Swin", "swin", re.compile(r"^(classifier\.|(swin\.)?layernorm\.)"),
                      _SWIN_BUFFERS, _hf_swin_entries),
}


def detect_layout(names: List[str], where: str) -> Layout:
  """The layout of a checkpoint from its tensor names; ValueError when none fits."""
  def has(pattern: str) -> bool:
    return any(re.search(pattern, n) for n in names)

  if has(r"(^|\.)embedder\.embedder\."):
    return LAYOUTS["hf_resnet"]
  if has(r"(^|\.)embeddings\.patch_embeddings\."):
    return LAYOUTS["hf_swin"]
  if has(r"^stem\.conv1\.") or has(r"^res[2-5]\.\d+\."):
    return LAYOUTS["detectron2_resnet"]
  if has(r"^conv1\.weight$") and has(r"^layer1\."):
    return LAYOUTS["torchvision_resnet"]
  if has(r"^patch_embed\.proj\."):
    if has(r"^layers\.0\.downsample\."):
      return LAYOUTS["official_swin"]
    if has(r"^layers\.\d+\.downsample\."):
      return LAYOUTS["timm_swin"]
  shown = sorted(names)[:8]
  raise ValueError(f"{where}: tensor names fit no known ImageNet backbone layout (detectron2, "
                   f"torchvision, timm, official Swin, transformers); first names: {shown}")


# ------------------------------------------------------------------------------------ our tree

def _blocks(tree: Dict[str, Any]) -> int:
  return sum(1 for k in tree if re.fullmatch(r"block\d+", k))


def backbone_shape(params: Dict[str, Any]) -> ml_collections.ConfigDict:
  """The layout of our backbone params: name and stage_blocks (ResNet) / depths, window (Swin)."""
  if "stem" in params:
    return ml_collections.ConfigDict(dict(
        name="resnet", stage_blocks=tuple(_blocks(params[f"res{s}"]) for s in range(2, 6))))
  if "patch_embed" in params:
    table = params["layer0"]["block0"]["attn"][TABLE_SUFFIX]
    return ml_collections.ConfigDict(dict(
        name="swin", depths=tuple(_blocks(params[f"layer{s}"]) for s in range(4)),
        window_size=relative_position_resize.table_window(table.shape[0])))
  raise ValueError(f"backbone params with top-level keys {sorted(params)[:6]} are neither our ResNet "
                   "nor our Swin: pass the variables of build_backbone(cfg.model.backbone)")


def _check_hub_config(hub_config: Dict[str, Any], shape: ml_collections.ConfigDict, path: str) -> None:
  """A Hub config.json must describe the network we build (window aside)."""
  if hub_config.get("model_type") != shape.name:
    raise ValueError(f"{path}: config.json has model_type {hub_config.get('model_type')!r}, the "
                     f"config's backbone is {shape.name!r}")
  cfg = hf_backbone.config_from_hf(dict(hub_config, out_features=HF_STAGES))
  blocks = tuple(cfg.stage_blocks if shape.name == "resnet" else cfg.depths)
  ours = tuple(shape.stage_blocks if shape.name == "resnet" else shape.depths)
  if blocks != ours:
    raise ValueError(f"{path}: config.json has blocks per stage {blocks}, the config's backbone {ours}")


# ------------------------------------------------------------------------------------ loading

@dataclasses.dataclass
class LoadReport:
  """What `convert_imagenet_backbone` did, for the log.

  Attributes:
    path: the file or directory read.
    container: its container (weight_files).
    layout: the name layout found.
    loaded: tensors of the checkpoint that went into the backbone.
    values: scalars in those tensors.
    dropped: classification-head tensor names, not loaded.
    ignored_buffers: buffer tensors skipped (BatchNorm counters, Swin index and mask buffers).
    resized_tables: how many relative-position tables were resized.
    windows: (checkpoint window, our window) of those tables.
    kept_fresh: our parameter paths the checkpoint has no tensors for (Swin's stage output norms).
  """
  path: str
  container: str
  layout: str
  loaded: int
  values: int
  dropped: List[str]
  ignored_buffers: int
  resized_tables: int = 0
  windows: Tuple[int, int] = (0, 0)
  kept_fresh: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"backbone.init_from {self.path}: {self.container}, {self.layout} names; loaded "
             f"{self.loaded} tensors ({self.values:,} values)",
             f"  dropped classification head ({len(self.dropped)}): {', '.join(self.dropped) or 'none'}",
             f"  ignored buffers: {self.ignored_buffers}"]
    if self.resized_tables:
      lines.append(f"  resized {self.resized_tables} relative-position tables from window "
                   f"{self.windows[0]} to {self.windows[1]} (bicubic)")
    if self.kept_fresh:
      lines.append(f"  not in the checkpoint, kept as initialised: {', '.join(self.kept_fresh)}")
    return "\n".join(lines)


def _fresh_swin_norms(params: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """Our norm0..norm3 under the transformers names the placement expects."""
  out = {}
  for s in range(4):
    out[f"hidden_states_norms.stage{s + 1}.weight"] = np.asarray(params[f"norm{s}"]["scale"])
    out[f"hidden_states_norms.stage{s + 1}.bias"] = np.asarray(params[f"norm{s}"]["bias"])
  return out


def _check_same_tree(new: Dict[str, Any], old: Dict[str, Any], where: str) -> None:
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(new)}
  want = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(old)}
  problems = [f"{k}: checkpoint {got.get(k)} vs model {want.get(k)}"
              for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k)]
  if problems:
    raise ValueError(f"{where} does not fit the config's backbone ({len(problems)} shapes differ): "
                     + "; ".join(problems[:10]))


def convert_imagenet_backbone(path: str, variables: Dict[str, Any]) -> Tuple[Dict[str, Any], LoadReport]:
  """ImageNet weights at `path` -> backbone variables shaped like `variables`, and a report.

  Args:
    path: a weights file (any container of `weight_files`) or a Hub directory.
    variables: {'params': ..., 'batch_stats': ... (ResNet)} of `build_backbone(cfg)`; they give
      the target shapes and the values of what ImageNet checkpoints do not hold.

  Raises:
    ValueError: names that map to no backbone tensor (listed), backbone tensors missing from the
      checkpoint (listed), shapes that differ, an unsafe or unreadable file.
  """
  weights = weight_files.read_weight_file(path)
  shape = backbone_shape(variables["params"])
  layout = detect_layout(list(weights.arrays), path)
  if layout.backbone != shape.name:
    raise ValueError(f"{path} holds a {layout.name} backbone, but the config's backbone is {shape.name}")
  if weights.hub_config is not None:
    _check_hub_config(weights.hub_config, shape, path)

  expected = hf_backbone.expected_hf_names(shape)
  dropped, ignored, unmapped, arrays, loaded = [], 0, [], {}, []
  for name, value in weights.arrays.items():
    if layout.head.search(name):
      dropped.append(name)
    elif layout.buffers.search(name):
      ignored += 1
    else:
      entries = layout.to_hf(name, np.asarray(value, np.float32))
      if entries is None or not entries.keys() <= expected:
        unmapped.append(name)
      elif entries.keys() & arrays.keys():
        raise ValueError(f"{path}: {name} gives a backbone tensor that another name already gave "
                         f"({sorted(entries.keys() & arrays.keys())[0]}); keep one of the two")
      else:
        arrays.update(entries)
        loaded.append(value)
  fresh = _fresh_swin_norms(variables["params"]) if shape.name == "swin" else {}
  missing = sorted(expected - arrays.keys() - fresh.keys())
  if unmapped or missing:
    raise ValueError(
        f"{path} ({layout.name}) does not fit the config's {shape.name} backbone: "
        f"{len(unmapped)} checkpoint tensors map to nothing in it: {sorted(unmapped)[:20]}; "
        f"{len(missing)} backbone tensors are missing from the checkpoint (transformers names): "
        f"{missing[:20]}")
  kept_fresh = sorted(k for k in fresh if k not in arrays)
  arrays.update({k: fresh[k] for k in kept_fresh})

  report = LoadReport(path, weights.container, layout.name, len(loaded),
                      int(sum(np.size(v) for v in loaded)), sorted(dropped), ignored,
                      kept_fresh=[f"norm{int(k[len('hidden_states_norms.stage')]) - 1}"
                                  for k in kept_fresh if k.endswith(".weight")])
  for name in [n for n in arrays if n.endswith(TABLE_SUFFIX)]:
    window = relative_position_resize.table_window(arrays[name].shape[0])
    if window != shape.window_size:
      arrays[name] = relative_position_resize.resize_relative_position_table(arrays[name], shape.window_size)
      report.resized_tables += 1
      report.windows = (window, shape.window_size)

  new = hf_backbone.hf_names_to_variables(shape, arrays)
  new = {collection: new[collection] for collection in variables}
  _check_same_tree(new, variables, path)
  return new, report


def load_imagenet_backbone(source: Union[str, os.PathLike, ml_collections.ConfigDict],
                           variables: Dict[str, Any]) -> Dict[str, Any]:
  """New backbone variables with the ImageNet weights of `source`; logs what was loaded.

  Args:
    source: `cfg.model.backbone` (its `init_from` names the weights) or the weights' path.
    variables: {'params': ..., 'batch_stats': ...} of `build_backbone(cfg.model.backbone)`.
  """
  path = source.get("init_from") if isinstance(source, ml_collections.ConfigDict) else source
  if path is None:
    raise ValueError("model.backbone.init_from is not set: pass the path of the ImageNet weights")
  new, report = convert_imagenet_backbone(os.fspath(path), variables)
  logging.info("%s", report.summary())
  return new


def init_model_backbone(backbone_cfg: ml_collections.ConfigDict, variables: Dict[str, Any]) -> Dict[str, Any]:
  """Model variables ({'params': {'backbone': ..., ...}, ...}) with the backbone from
  `backbone_cfg.init_from`; every other entry unchanged."""
  backbone = {c: variables[c]["backbone"] for c in variables if "backbone" in variables[c]}
  loaded = load_imagenet_backbone(backbone_cfg, backbone)
  return {c: dict(tree, backbone=loaded[c]) if c in loaded else tree for c, tree in variables.items()}
