"""transformers (5.24) Mask2Former backbone tensors -> our backbone config and Flax variables.

Input names are those under `model.pixel_level_module.encoder.` with that prefix stripped:
  ResNet (ResNetBackbone): embedder.embedder.{convolution, normalization}.*,
    encoder.stages.{s}.layers.{i}.{layer.{k}, shortcut}.{convolution, normalization}.*
  Swin (SwinBackbone), in-memory names: swin.embeddings.{patch_embeddings.projection, norm}.*,
    swin.encoder.layers.{s}.blocks.{j}.{layernorm_before, layernorm_after,
    attention.{q,k,v,o}_proj, attention.relative_position_bias.relative_position_bias_table,
    mlp.fc1, mlp.fc2}.*, swin.encoder.layers.{s}.downsample.{norm, reduction}.*,
    hidden_states_norms.stage{1..4}.*
  Swin, names of a Hub `model.safetensors` (what save_pretrained writes): embeddings.*, encoder.*,
    attention.self.{query,key,value,relative_position_bias_table}, attention.output.dense,
    intermediate.dense (fc1), output.dense (fc2).
Unused tensors that are dropped: transformers' final Swin LayerNorm (swin.layernorm.*), the
relative_position_index buffers, BatchNorm num_batches_tracked.
"""
import re
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2f_jax.models.backbone import build_backbone

# (collection, path in that collection, transform of the PyTorch array)
Target = Tuple[str, Tuple[str, ...], Callable[[np.ndarray], np.ndarray]]

IGNORED = re.compile(
    r"(^(swin\.)?layernorm\.(weight|bias)$|relative_position_index$|num_batches_tracked$)")

# Hub (older) Swin names -> in-memory names, applied in order.
SWIN_HUB_RENAMES = (
    (r"^embeddings\.", "swin.embeddings."),
    (r"^encoder\.", "swin.encoder."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.blocks\.(\d+)\.output\.dense\.", r".blocks.\1.mlp.fc2."),
)


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _linear(a: np.ndarray) -> np.ndarray:
  """Linear weight [out, in] -> Dense kernel [in, out]."""
  return a.T


def _conv(a: np.ndarray) -> np.ndarray:
  """Conv weight OIHW -> HWIO."""
  return a.transpose(2, 3, 1, 0)


def _stage_list(hf: Mapping[str, Any], key: str) -> Tuple[int, ...]:
  if key not in hf:
    raise ValueError(f"HF backbone config lacks {key!r}")
  return tuple(int(v) for v in hf[key])


def _check(hf: Mapping[str, Any], key: str, allowed, what: str) -> None:
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise ValueError(f"HF backbone config {key}={value!r} is not supported: {what}")


def _check_out_features(hf: Mapping[str, Any]) -> None:
  out = list(hf.get("out_features") or [])
  if out != ["stage1", "stage2", "stage3", "stage4"]:
    raise ValueError(f"HF backbone config out_features={out} must be ['stage1', ..., 'stage4']: "
                     "Mask2Former uses all four stages")


# ------------------------------------------------------------------------------------ ResNet

def _resnet_config(hf: Mapping[str, Any], norm: str) -> ml_collections.ConfigDict:
  _check(hf, "layer_type", ("bottleneck",), "only bottleneck ResNets are built")
  _check(hf, "hidden_act", ("relu",), "ResNet activations are ReLU")
  _check(hf, "downsample_in_bottleneck", (False,),
         "the stride must be on the 3x3 conv (torchvision style)")
  _check(hf, "downsample_in_first_stage", (False,), "res2 must not downsample")
  _check(hf, "num_channels", (3,), "images are RGB")
  _check_out_features(hf)
  depths = _stage_list(hf, "depths")
  hidden = _stage_list(hf, "hidden_sizes")
  if len(depths) != 4 or len(hidden) != 4:
    raise ValueError(f"HF ResNet config needs 4 stages, got depths={depths}, hidden_sizes={hidden}")
  base_width = hidden[0] // 4
  if hidden != tuple(4 * base_width * 2**i for i in range(4)):
    raise ValueError(f"HF ResNet hidden_sizes={hidden} must be 4 * w * (1, 2, 4, 8) for a "
                     "bottleneck width w")
  return ml_collections.ConfigDict(dict(
      name="resnet", stage_blocks=depths,
      stem_width=int(hf.get("embedding_size", 64)), base_width=base_width, norm=norm, norm_eps=1e-5))


def _conv_norm_targets(hf_prefix: str, path: Tuple[str, ...]) -> Dict[str, Target]:
  """Names of a PyTorch conv + BatchNorm pair -> our ConvNorm module at `path`."""
  return {
      f"{hf_prefix}.convolution.weight": ("params", path + ("kernel",), _conv),
      f"{hf_prefix}.normalization.weight": ("params", path + ("norm", "scale"), _identity),
      f"{hf_prefix}.normalization.bias": ("params", path + ("norm", "bias"), _identity),
      f"{hf_prefix}.normalization.running_mean": ("batch_stats", path + ("norm", "mean"), _identity),
      f"{hf_prefix}.normalization.running_var": ("batch_stats", path + ("norm", "var"), _identity),
  }


def _resnet_targets(cfg: ml_collections.ConfigDict) -> Dict[str, Target]:
  targets = _conv_norm_targets("embedder.embedder", ("stem", "conv1"))
  for s, num_blocks in enumerate(cfg.stage_blocks):
    for i in range(num_blocks):
      hf_block = f"encoder.stages.{s}.layers.{i}"
      block = (f"res{s + 2}", f"block{i}")
      for k in range(3):
        targets.update(_conv_norm_targets(f"{hf_block}.layer.{k}", block + (f"conv{k + 1}",)))
      if i == 0:
        targets.update(_conv_norm_targets(f"{hf_block}.shortcut", block + ("shortcut",)))
  return targets


# ------------------------------------------------------------------------------------ Swin

def _swin_config(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
  _check(hf, "hidden_act", ("gelu",), "Swin uses the exact GELU")
  _check(hf, "qkv_bias", (True,), "Swin's qkv projection has a bias")
  _check(hf, "use_absolute_embeddings", (False,), "the authors' Swin has no absolute position embedding")
  _check(hf, "num_channels", (3,), "images are RGB")
  _check_out_features(hf)
  eps = float(hf.get("layer_norm_eps", 1e-5))
  if abs(eps - 1e-5) > 1e-12:
    raise ValueError(f"HF Swin layer_norm_eps={eps} is not supported: every Swin LayerNorm uses 1e-5")
  depths, heads = _stage_list(hf, "depths"), _stage_list(hf, "num_heads")
  if len(depths) != 4 or len(heads) != 4:
    raise ValueError(f"HF Swin config needs 4 stages, got depths={depths}, num_heads={heads}")
  for key in ("embed_dim", "window_size"):
    if key not in hf:
      raise ValueError(f"HF backbone config lacks {key!r}")
  return ml_collections.ConfigDict(dict(
      name="swin", patch_size=int(hf.get("patch_size", 4)), mlp_ratio=float(hf.get("mlp_ratio", 4.0)),
      drop_path_rate=float(hf.get("drop_path_rate", 0.3)), embed_dim=int(hf["embed_dim"]),
      depths=depths, num_heads=heads, window_size=int(hf["window_size"])))


def _linear_targets(hf_prefix: str, path: Tuple[str, ...], bias: bool = True) -> Dict[str, Target]:
  targets = {f"{hf_prefix}.weight": ("params", path + ("kernel",), _linear)}
  if bias:
    targets[f"{hf_prefix}.bias"] = ("params", path + ("bias",), _identity)
  return targets


def _layer_norm_targets(hf_prefix: str, path: Tuple[str, ...]) -> Dict[str, Target]:
  return {f"{hf_prefix}.weight": ("params", path + ("scale",), _identity),
          f"{hf_prefix}.bias": ("params", path + ("bias",), _identity)}


def _swin_targets(cfg: ml_collections.ConfigDict) -> Dict[str, Target]:
  """Every name except q/k/v, which `_pack_qkv` handles."""
  projection = "swin.embeddings.patch_embeddings.projection"
  targets = {
      f"{projection}.weight": ("params", ("patch_embed", "proj", "kernel"), _conv),
      f"{projection}.bias": ("params", ("patch_embed", "proj", "bias"), _identity),
      **_layer_norm_targets("swin.embeddings.norm", ("patch_embed", "norm")),
  }
  for s, depth in enumerate(cfg.depths):
    hf_stage = f"swin.encoder.layers.{s}"
    for j in range(depth):
      hf_block, block = f"{hf_stage}.blocks.{j}", (f"layer{s}", f"block{j}")
      targets.update(_layer_norm_targets(f"{hf_block}.layernorm_before", block + ("norm1",)))
      targets.update(_layer_norm_targets(f"{hf_block}.layernorm_after", block + ("norm2",)))
      targets.update(_linear_targets(f"{hf_block}.attention.o_proj", block + ("attn", "proj")))
      targets[f"{hf_block}.attention.relative_position_bias.relative_position_bias_table"] = (
          "params", block + ("attn", "relative_position_bias_table"), _identity)
      targets.update(_linear_targets(f"{hf_block}.mlp.fc1", block + ("mlp", "fc1")))
      targets.update(_linear_targets(f"{hf_block}.mlp.fc2", block + ("mlp", "fc2")))
    if s < 3:
      downsample = (f"layer{s}", "downsample")
      targets.update(_layer_norm_targets(f"{hf_stage}.downsample.norm", downsample + ("norm",)))
      targets.update(_linear_targets(f"{hf_stage}.downsample.reduction", downsample + ("reduction",),
                                     bias=False))
    targets.update(_layer_norm_targets(f"hidden_states_norms.stage{s + 1}", (f"norm{s}",)))
  return targets


def _qkv_names(cfg: ml_collections.ConfigDict):
  """(in-memory q/k/v prefix, our block path) for every block."""
  for s, depth in enumerate(cfg.depths):
    for j in range(depth):
      yield f"swin.encoder.layers.{s}.blocks.{j}.attention", (f"layer{s}", f"block{j}", "attn", "qkv")


def normalise_swin_names(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Hub names -> in-memory names (in-memory names pass unchanged); refuses a name given twice."""
  renamed = {}
  for name, value in state_dict.items():
    new = name
    for pattern, replacement in SWIN_HUB_RENAMES:
      new = re.sub(pattern, replacement, new)
    if new in renamed:
      raise ValueError(f"Swin tensor {new!r} is given twice (as Hub and in-memory names); "
                       "pass one name set")
    renamed[new] = value
  return renamed


# ------------------------------------------------------------------------------------ entry point

def _set(tree: Dict[str, Any], path: Tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _check_shapes(cfg: ml_collections.ConfigDict, variables: Dict[str, Any]) -> None:
  """Compares every converted array with the shapes the Flax module declares."""
  module = build_backbone(cfg, jnp.float32)
  size = 32 * max(cfg.get("window_size", 1), 2)
  expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                                train=False))
  for collection in ("params", "batch_stats"):
    want = {jax.tree_util.keystr(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(expected.get(collection, {}))}
    got = {jax.tree_util.keystr(p): tuple(x.shape)
           for p, x in jax.tree_util.tree_leaves_with_path(variables[collection])}
    if want.keys() != got.keys():
      missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
      raise ValueError(f"converted {collection} paths differ from the module's: missing {missing[:10]}, "
                       f"extra {extra[:10]}")
    wrong = [f"{p}: {got[p]} (expected {want[p]})" for p in want if want[p] != got[p]]
    if wrong:
      raise ValueError(f"converted {collection} shapes do not match the config: {wrong[:10]}")


def config_from_hf(hf_backbone_config: Mapping[str, Any], norm: str = "frozen_bn") -> ml_collections.ConfigDict:
  """transformers ResNetConfig / SwinConfig (object or dict) -> backbone config as configs.base builds it.

  Raises:
    ValueError: a model type or setting our backbones do not build.
  """
  if hasattr(hf_backbone_config, "to_dict"):  # a transformers config object
    hf_backbone_config = hf_backbone_config.to_dict()
  model_type = hf_backbone_config.get("model_type")
  if model_type == "resnet":
    return _resnet_config(hf_backbone_config, norm)
  if model_type == "swin":
    return _swin_config(hf_backbone_config)
  raise ValueError(f"HF backbone model_type must be 'resnet' or 'swin', got {model_type!r}")


def expected_hf_names(cfg: ml_collections.ConfigDict) -> set:
  """Every transformers in-memory tensor name (q/k/v separate) the backbone of `cfg` takes.

  Only cfg.name and cfg.stage_blocks (ResNet) / cfg.depths (Swin) are read.
  """
  if cfg.name == "resnet":
    return set(_resnet_targets(cfg))
  return set(_swin_targets(cfg)) | {f"{prefix}.{p}_proj.{kind}" for prefix, _ in _qkv_names(cfg)
                                    for p in "qkv" for kind in ("weight", "bias")}


def hf_names_to_variables(cfg: ml_collections.ConfigDict,
                          arrays: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """{in-memory name: float32 array} holding exactly `expected_hf_names(cfg)` ->
  {'params': ..., 'batch_stats': ...} (kernels transposed, q/k/v packed); shapes unchecked."""
  resnet = cfg.name == "resnet"
  targets = _resnet_targets(cfg) if resnet else _swin_targets(cfg)
  variables = {"params": {}, "batch_stats": {}}
  for name, (collection, path, transform) in targets.items():
    _set(variables[collection], path, np.ascontiguousarray(transform(arrays[name])))
  for prefix, path in ([] if resnet else _qkv_names(cfg)):
    weight = np.concatenate([arrays[f"{prefix}.{p}_proj.weight"] for p in "qkv"], axis=0)  # [3C, C]
    bias = np.concatenate([arrays[f"{prefix}.{p}_proj.bias"] for p in "qkv"], axis=0)  # [3C]
    _set(variables["params"], path + ("kernel",), np.ascontiguousarray(weight.T))
    _set(variables["params"], path + ("bias",), bias)
  return variables


def convert_hf_backbone(hf_backbone_config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                        norm: str = "frozen_bn") -> Tuple[ml_collections.ConfigDict, Dict[str, Any]]:
  """transformers backbone config (`config.backbone_config.to_dict()`) and tensors -> (backbone
  config as configs.base builds it, {'params': ..., 'batch_stats': ...} of `build_backbone`).

  Args:
    hf_backbone_config: dict of a transformers ResNetConfig or SwinConfig.
    state_dict: name -> array, names relative to `model.pixel_level_module.encoder.`.
    norm: ResNet only: 'frozen_bn' (COCO, ADE20K) or 'sync_bn' (Cityscapes); the tensors are the same.

  Raises:
    ValueError: unsupported config, unexpected or missing tensor names, wrong shapes.
  """
  cfg = config_from_hf(hf_backbone_config, norm)
  arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not IGNORED.search(k)}
  if cfg.name == "swin":
    arrays = normalise_swin_names(arrays)
  expected = expected_hf_names(cfg)
  unexpected, missing = sorted(arrays.keys() - expected), sorted(expected - arrays.keys())
  if unexpected or missing:
    raise ValueError(f"{cfg.name} backbone tensors do not match the config: unexpected names "
                     f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}, missing names "
                     f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
  variables = hf_names_to_variables(cfg, arrays)
  _check_shapes(cfg, variables)
  return cfg, variables
