"""Checkpoint converters: the authors' detectron2 pickles, Hub directories, hostile pickles."""
import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from m2f_jax import variables_io
from m2f_jax.convert.detectron2 import from_detectron2
from m2f_jax.convert.hf import from_hf
from m2f_jax.models import build_model
import torch_reference
from torch_reference import hf_config, random_model, state_dict_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS_R50_KEYS = torch_reference.AUTHORS_R50_KEYS

# transformers in-memory name -> the authors' detectron2 name (REFERENCE.md §5), written
# independently of the converter. Entries whose target holds "{qkv}" are packed q; k; v.
_TO_DETECTRON2 = [
    # ResNet backbone
    (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.convolution\.", "backbone.stem.conv1."),
    (r"model\.pixel_level_module\.encoder\.embedder\.embedder\.normalization\.", "backbone.stem.conv1.norm."),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut."),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.shortcut.norm."),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"model\.pixel_level_module\.encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
     lambda m: f"backbone.res{int(m[1]) + 2}.{m[2]}.conv{int(m[3]) + 1}.norm."),
    # Swin backbone
    (r"model\.pixel_level_module\.encoder\.swin\.embeddings\.patch_embeddings\.projection\.",
     "backbone.patch_embed.proj."),
    (r"model\.pixel_level_module\.encoder\.swin\.embeddings\.norm\.", "backbone.patch_embed.norm."),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.",
     r"backbone.layers.\1.blocks.\2.norm1."),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.",
     r"backbone.layers.\1.blocks.\2.norm2."),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.([qkv])_proj\.",
     r"backbone.layers.\1.blocks.\2.attn.qkv.{\3}"),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.",
     r"backbone.layers.\1.blocks.\2.attn.proj."),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\."
     r"relative_position_bias\.relative_position_bias_table",
     r"backbone.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.",
     r"backbone.layers.\1.blocks.\2.mlp."),
    (r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.(\d+)\.downsample\.",
     r"backbone.layers.\1.downsample."),
    (r"model\.pixel_level_module\.encoder\.hidden_states_norms\.stage(\d)\.",
     lambda m: f"backbone.norm{int(m[1]) - 1}."),
    # pixel decoder
    (r"model\.pixel_level_module\.decoder\.input_projections\.", "sem_seg_head.pixel_decoder.input_proj."),
    (r"model\.pixel_level_module\.decoder\.level_embed", "sem_seg_head.pixel_decoder.transformer.level_embed"),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn\.",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.self_attn."),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm1."),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.final_layer_norm\.",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.norm2."),
    (r"model\.pixel_level_module\.decoder\.encoder\.layers\.(\d+)\.fc(\d)\.",
     r"sem_seg_head.pixel_decoder.transformer.encoder.layers.\1.linear\2."),
    (r"model\.pixel_level_module\.decoder\.mask_projection\.", "sem_seg_head.pixel_decoder.mask_features."),
    (r"model\.pixel_level_module\.decoder\.(adapter|layer)_1\.0\.", r"sem_seg_head.pixel_decoder.\1_1."),
    (r"model\.pixel_level_module\.decoder\.(adapter|layer)_1\.1\.", r"sem_seg_head.pixel_decoder.\1_1.norm."),
    # transformer decoder
    (r"model\.transformer_module\.queries_features\.", "sem_seg_head.predictor.query_feat."),
    (r"model\.transformer_module\.queries_embedder\.", "sem_seg_head.predictor.query_embed."),
    (r"model\.transformer_module\.level_embed\.", "sem_seg_head.predictor.level_embed."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
     r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn.in_proj_\3{\2}"),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"sem_seg_head.predictor.transformer_self_attention_layers.\1.self_attn.out_proj."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
     r"sem_seg_head.predictor.transformer_self_attention_layers.\1.norm."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn\.",
     r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.multihead_attn."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.cross_attn_layer_norm\.",
     r"sem_seg_head.predictor.transformer_cross_attention_layers.\1.norm."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.fc(\d)\.",
     r"sem_seg_head.predictor.transformer_ffn_layers.\1.linear\2."),
    (r"model\.transformer_module\.decoder\.layers\.(\d+)\.final_layer_norm\.",
     r"sem_seg_head.predictor.transformer_ffn_layers.\1.norm."),
    (r"model\.transformer_module\.decoder\.layernorm\.", "sem_seg_head.predictor.decoder_norm."),
    (r"model\.transformer_module\.decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.",
     r"sem_seg_head.predictor.mask_embed.layers.\1."),
    (r"class_predictor\.", "sem_seg_head.predictor.class_embed."),
    (r"criterion\.", "criterion."),
]


def to_detectron2(state_dict):
  """The authors' checkpoint layout of a transformers state dict (q, k, v packed again)."""
  out, packed = {}, {}
  for name, value in state_dict.items():
    if name.endswith("num_batches_tracked") or ".swin.layernorm." in name:
      continue  # not in the authors' files: a counter, and transformers' unused final Swin norm
    for pattern, target in _TO_DETECTRON2:
      match = re.match(pattern, name)
      if match:
        new = (target(match) if callable(target) else match.expand(target)) + name[match.end():]
        break
    else:
      raise AssertionError(f"test mapping lacks {name}")
    part = re.search(r"\{([qkv])\}", new)
    if part:
      packed.setdefault(new.replace(part.group(0), ""), {})[part.group(1)] = value
    else:
      out[new] = value
  for name, parts in packed.items():
    out[name] = np.concatenate([parts[p] for p in "qkv"], axis=0)
  return out


def write_authors_pickle(path, model_state):
  """Pickled the way the authors' model_final_*.pkl files are: a dict with a 'model' entry."""
  with open(path, "wb") as f:
    pickle.dump({"model": model_state, "__author__": "Mask2Former"}, f)


def assert_same_tree(a, b):
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


@pytest.fixture(scope="module", params=["swin", "resnet"])
def torch_model(request):
  return random_model(hf_config(request.param), seed=2)


def test_detectron2_layout_equals_from_hf(torch_model, tmp_path):
  state = state_dict_numpy(torch_model)
  cfg, hf_variables = from_hf(torch_model.config.to_dict(), state)
  authors = to_detectron2(state)
  if cfg.model.backbone.name == "swin":  # buffers the authors' Swin saves; the converter drops them
    authors["backbone.layers.0.blocks.0.attn.relative_position_index"] = np.zeros((16, 16), np.int64)
  path = tmp_path / "model_final_test.pkl"
  write_authors_pickle(path, authors)
  variables = from_detectron2(str(path), cfg)
  assert_same_tree(variables, hf_variables)

  images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
  apply = jax.jit(build_model(cfg).apply)
  ours, reference = apply(variables, images), apply(hf_variables, images)
  for key in ("class_logits", "mask_logits"):
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(reference[key]))


def test_detectron2_rejects_a_checkpoint_of_another_shape(torch_model):
  state = state_dict_numpy(torch_model)
  cfg, _ = from_hf(torch_model.config.to_dict(), state)
  cfg.model.num_classes += 1
  with pytest.raises(ValueError, match="class_predictor.weight"):
    from_detectron2(to_detectron2(state), cfg)
  authors = to_detectron2(state)
  authors["sem_seg_head.predictor.unknown.weight"] = np.zeros(3, np.float32)
  cfg.model.num_classes -= 1
  with pytest.raises(ValueError, match="unknown.weight"):
    from_detectron2(authors, cfg)


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_before_running(tmp_path):
  marker = tmp_path / "payload_ran"
  path = tmp_path / "model_final_evil.pkl"
  write_authors_pickle(path, {"backbone.stem.conv1.weight": np.zeros((4, 3, 7, 7), np.float32),
                              "evil": _Payload(marker)})
  cfg = __import__("configs.coco_panoptic_r50", fromlist=["get_config"]).get_config()
  with pytest.raises(ValueError, match="refusing to load"):
    from_detectron2(str(path), cfg)
  assert not marker.exists()
  pickle.loads(path.read_bytes())  # the same bytes do run the payload under plain pickle
  assert marker.exists()


def test_every_name_of_the_authors_r50_checkpoint_converts():
  state = {}
  with open(AUTHORS_R50_KEYS) as f:
    for line in f:
      if line.strip() and not line.startswith("#"):
        name, shape = line.split(" ", 1)
        state[name] = np.zeros([int(s) for s in re.findall(r"\d+", shape)], np.float32)
  cfg = __import__("configs.coco_panoptic_r50", fromlist=["get_config"]).get_config()
  variables = from_detectron2(state, cfg)  # raises unless every name maps and every shape fits
  count = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  assert count == 44_036_998


def test_hub_directory_converts_with_the_tool(torch_model, tmp_path):
  hub_dir, out_dir = tmp_path / "hub", tmp_path / "converted"
  torch_model.save_pretrained(hub_dir)
  result = subprocess.run(
      [sys.executable, "-m", "m2f_jax.tools.convert", "--from", "hf", "--src", str(hub_dir),
       "--out", str(out_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  cfg, expected = from_hf(torch_model.config.to_dict(), state_dict_numpy(torch_model))
  assert_same_tree(variables_io.load_variables(str(out_dir)), expected)
  saved = variables_io.load_config(str(out_dir))
  assert saved["model"]["decoder"] == cfg.model.decoder.to_dict()
  assert saved["model"]["backbone"]["name"] == cfg.model.backbone.name


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("model.transformer_module.decoder.layers.0.fc1.bias"), "missing: decoder.layers.0.fc1.bias"),
    (lambda s: s.update({"model.transformer_module.extra.weight": np.zeros(2, np.float32)}),
     "unexpected: extra.weight"),
    (lambda s: s.update({"class_predictor.bias": np.zeros(9, np.float32)}), "class_predictor.bias has shape"),
    (lambda s: s.update({"model.somewhere.weight": np.zeros(2, np.float32)}), "unknown names"),
])
def test_from_hf_names_bad_checkpoints(torch_model, edit, message):
  state = state_dict_numpy(torch_model)
  edit(state)
  with pytest.raises(ValueError, match=re.escape(message)):
    from_hf(torch_model.config.to_dict(), state)


@pytest.mark.parametrize("key,value", [("pre_norm", True), ("activation_function", "gelu"),
                                       ("decoder_layers", 0), ("id2label", {})])
def test_from_hf_rejects_unsupported_configs(torch_model, key, value):
  hf_dict = torch_model.config.to_dict()
  hf_dict[key] = value
  with pytest.raises(ValueError, match=key):
    from_hf(hf_dict, state_dict_numpy(torch_model))


def test_tool_converts_a_detectron2_pickle(torch_model, tmp_path):
  from m2f_jax.tools import convert as convert_tool
  state = state_dict_numpy(torch_model)
  cfg, expected = from_hf(torch_model.config.to_dict(), state)
  path = tmp_path / "model_final_test.pkl"
  write_authors_pickle(path, to_detectron2(state))
  with pytest.raises(ValueError, match="needs --config"):
    convert_tool.convert("detectron2", str(path), str(tmp_path / "no_config"))
  convert_tool.convert("detectron2", str(path), str(tmp_path / "out"), cfg)
  assert_same_tree(variables_io.load_variables(str(tmp_path / "out")), expected)
  assert variables_io.load_config(str(tmp_path / "out"))["model"]["num_classes"] == cfg.model.num_classes
