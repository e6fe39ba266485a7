"""ImageNet backbone initialisation (`model.backbone.init_from`): every checkpoint layout against PyTorch.

Each test writes an R50 or Swin-T ImageNet checkpoint in one exact on-disk layout from a randomly
initialised transformers classification model (head and final norm included), loads it into our
backbone and compares the four feature maps with transformers' ResNetBackbone / SwinBackbone holding
the same weights. torchvision and timm do not run here (the PyPI torchvision wheel for torch 2.13 is
CUDA-built and does not load against the CPU torch; timm imports torchvision), so their layouts are
written by renaming transformers' tensors with the rules those projects' names follow.
"""
import json
import os
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from configs.base import resnet_backbone, swin_backbone
from m2f_jax import parallel
from m2f_jax.convert import imagenet_backbone
from m2f_jax.convert.hf_backbone import convert_hf_backbone
from m2f_jax.models import build_model
from m2f_jax.models.backbone import build_backbone
from m2f_jax.training import checkpointing
from m2f_jax.training import loop
from m2f_jax.training import optimizer
import torch_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["stage1", "stage2", "stage3", "stage4"]
IMAGE_HW = (64, 64)
R50 = dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
           layer_type="bottleneck", downsample_in_bottleneck=False)
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
              image_size=224, drop_path_rate=0.0)


# ------------------------------------------------------------------------------------ layouts

def _torchvision_names(hf_state: dict) -> dict:
  """transformers ResNetForImageClassification names -> torchvision's resnet50 names."""
  out = {}
  for name, value in hf_state.items():
    new = re.sub(r"^resnet\.embedder\.embedder\.convolution\.", "conv1.", name)
    new = re.sub(r"^resnet\.embedder\.embedder\.normalization\.", "bn1.", new)
    new = re.sub(r"^classifier\.1\.", "fc.", new)
    match = re.match(r"^resnet\.encoder\.stages\.(\d)\.layers\.(\d+)\.(.+)$", new)
    if match:
      stage, block, rest = match.groups()
      rest = re.sub(r"^layer\.(\d)\.convolution\.", lambda m: f"conv{int(m.group(1)) + 1}.", rest)
      rest = re.sub(r"^layer\.(\d)\.normalization\.", lambda m: f"bn{int(m.group(1)) + 1}.", rest)
      rest = re.sub(r"^shortcut\.convolution\.", "downsample.0.", rest)
      rest = re.sub(r"^shortcut\.normalization\.", "downsample.1.", rest)
      new = f"layer{int(stage) + 1}.{block}.{rest}"
    assert new != name, name
    out[new] = value
  return out


def _detectron2_names(torchvision_state: dict) -> dict:
  """detectron2's tools/convert-torchvision-to-d2.py renaming (R-50.pkl), as numpy arrays."""
  out = {}
  for name, value in torchvision_state.items():
    new = name if "layer" in name else "stem." + name
    for t in (1, 2, 3, 4):
      new = new.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
      new = new.replace(f"bn{t}", f"conv{t}.norm")
    new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    out[new] = value.numpy()
  return out


def _official_swin_names(hf_state: dict, window: int) -> dict:
  """transformers SwinForImageClassification names -> the official Swin release's state dict,
  with its relative_position_index and attn_mask buffers."""
  out, n = {}, window * window
  for name, value in hf_state.items():
    new = re.sub(r"^swin\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj.", name)
    new = re.sub(r"^swin\.embeddings\.norm\.", "patch_embed.norm.", new)
    new = re.sub(r"^swin\.encoder\.", "", new)
    new = re.sub(r"^swin\.layernorm\.", "norm.", new)
    new = re.sub(r"^classifier\.", "head.", new)
    new = new.replace(".layernorm_before.", ".norm1.").replace(".layernorm_after.", ".norm2.")
    new = new.replace(".attention.o_proj.", ".attn.proj.")
    new = new.replace(".attention.relative_position_bias.relative_position_bias_table",
                      ".attn.relative_position_bias_table")
    match = re.match(r"^(layers\.\d+\.blocks\.(\d+))\.attention\.q_proj\.(weight|bias)$", new)
    if match:
      prefix, block, kind = match.groups()
      parts = [hf_state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
      out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(parts, 0)
      out[f"{prefix}.attn.relative_position_index"] = torch.randint(0, (2 * window - 1) ** 2, (n, n))
      if int(block) % 2:
        out[f"{prefix}.attn_mask"] = torch.zeros(4, n, n)
      continue
    if re.search(r"\.attention\.[kv]_proj\.", new) or new.endswith("relative_position_index"):
      continue
    out[new] = value
  return out


def _timm_swin_names(official: dict) -> dict:
  """Official Swin names -> timm's (patch merging opens the next stage, head.fc, no buffers)."""
  out = {}
  for name, value in official.items():
    if name.endswith(("relative_position_index", "attn_mask")):
      continue
    match = re.match(r"^layers\.(\d)\.downsample\.(.+)$", name)
    if match:
      name = f"layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    out[re.sub(r"^head\.", "head.fc.", name)] = value
  return out


def _numpy(state: dict) -> dict:
  return {k: v.detach().numpy().copy() for k, v in state.items()}


# ------------------------------------------------------------------------------------ models

def _classifier_and_backbone(kind: str, config: dict, seed: int, scale: float = 0.2):
  """A randomised transformers ImageNet classifier and its feature-map backbone, same weights.

  The backbone's per-stage output norms (Swin; the authors' additions, in no ImageNet checkpoint)
  keep their own random values."""
  if kind == "resnet":
    hf_config = transformers.ResNetConfig(num_labels=10, **config)
    classifier, backbone_cls, prefix = transformers.ResNetForImageClassification, transformers.ResNetBackbone, "resnet."
  else:
    hf_config = transformers.SwinConfig(num_labels=10, **config)
    classifier, backbone_cls, prefix = transformers.SwinForImageClassification, transformers.SwinBackbone, ""
  torch.manual_seed(seed)
  model = classifier(hf_config).eval()
  torch_reference.randomise_(model, seed, scale)
  backbone = backbone_cls(type(hf_config)(out_features=STAGES, **config)).eval()
  state = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
  missing, _ = backbone.load_state_dict(state, strict=False)
  assert all(k.startswith("hidden_states_norms.") for k in missing), missing
  return model, backbone


def _random_like(shapes, seed: int):
  """Arrays of the shapes of a variables tree, random: what a fresh init could hold."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


class Arch:
  """One backbone: the torch classifier and reference, our module, fresh variables, a jitted apply.

  The fresh variables are random (no init compile); the torch reference takes their Swin
  stage-output norms, which the checkpoints lack and the loader keeps."""

  def __init__(self, kind, hf_config, our_config, seed, scale=0.2):
    self.kind = kind
    self.classifier, self.torch_backbone = _classifier_and_backbone(kind, hf_config, seed, scale)
    self.cfg = our_config
    self.module = build_backbone(our_config)
    self.images = np.random.default_rng(seed).integers(0, 256, (1, *IMAGE_HW, 3), dtype=np.uint8)
    self.x = torch_reference.normalise(self.images).numpy().transpose(0, 2, 3, 1)
    shapes = jax.eval_shape(lambda: self.module.init(jax.random.key(0), self.x, train=False))
    self.fresh = _random_like(shapes, seed)
    if kind == "swin":
      with torch.no_grad():
        for s in range(4):
          norm = self.fresh["params"][f"norm{s}"]
          self.torch_backbone.hidden_states_norms[f"stage{s + 1}"].weight.copy_(torch.from_numpy(norm["scale"]))
          self.torch_backbone.hidden_states_norms[f"stage{s + 1}"].bias.copy_(torch.from_numpy(norm["bias"]))
    self.apply = jax.jit(lambda v, x: self.module.apply(v, x, train=False))
    with torch.no_grad():
      maps = self.torch_backbone(torch_reference.normalise(self.images)).feature_maps
    self.reference = [m.numpy().transpose(0, 2, 3, 1) for m in maps]

  def relative_errors(self, variables):
    """max |ours - torch| / max |torch| of each of the four maps."""
    ours = self.apply(variables, self.x)
    errors = []
    for name, ref in zip(("res2", "res3", "res4", "res5"), self.reference):
      assert ours[name].shape == ref.shape, (name, ours[name].shape, ref.shape)
      errors.append(float(np.max(np.abs(np.asarray(ours[name]) - ref)) / np.max(np.abs(ref))))
    return errors


@pytest.fixture(scope="module")
def r50():
  return Arch("resnet", R50, resnet_backbone(50), seed=0)


@pytest.fixture(scope="module")
def swin_t():
  # Weights of std 0.05 (not torch_reference's 0.2): at 0.2 the attention softmaxes saturate and
  # float32 rounding grows to ~1e-5 of res5 in either framework (each measured against float64 torch).
  return Arch("swin", SWIN_T, swin_backbone("tiny"), seed=1, scale=0.05)


# ------------------------------------------------------------------------------------ writers

def _write_torchvision_pth(arch, path):
  torch.save(_torchvision_names(arch.classifier.state_dict()), path)


def _write_legacy_torchvision_pth(arch, path):
  """torchvision's older files (resnet50-19c8e357.pth) predate the zip format."""
  torch.save(_torchvision_names(arch.classifier.state_dict()), path, _use_new_zipfile_serialization=False)


def _write_timm_resnet_safetensors(arch, path):
  state = _numpy(_torchvision_names(arch.classifier.state_dict()))
  safetensors.numpy.save_file({k: v for k, v in state.items() if "num_batches" not in k}, path)


def _write_detectron2_pkl(arch, path):
  names = _detectron2_names(_torchvision_names(arch.classifier.state_dict()))
  with open(path, "wb") as f:
    pickle.dump({"model": names, "__author__": "torchvision", "matching_heuristics": True}, f)


def _write_hub_directory(arch, path):
  arch.classifier.save_pretrained(path)


def _write_official_swin_pth(arch, path):
  torch.save({"model": _official_swin_names(arch.classifier.state_dict(), arch.cfg.window_size)}, path)


def _write_authors_swin_pkl(arch, path):
  """Mask2Former's tools/convert-pretrained-swin-model-to-d2.py: the state dict pickled as-is."""
  state = _official_swin_names(arch.classifier.state_dict(), arch.cfg.window_size)
  with open(path, "wb") as f:
    pickle.dump({"model": state, "__author__": "third_party", "matching_heuristics": True}, f)


def _write_timm_swin_safetensors(arch, path):
  state = _timm_swin_names(_official_swin_names(arch.classifier.state_dict(), arch.cfg.window_size))
  safetensors.numpy.save_file(_numpy(state), path)


RESNET_FORMATS = {
    "torchvision.pth": (_write_torchvision_pth, "torch zip", "torchvision/timm ResNet", ["fc.bias", "fc.weight"]),
    "resnet50-19c8e357.pth": (_write_legacy_torchvision_pth, "legacy torch.save", "torchvision/timm ResNet",
                              ["fc.bias", "fc.weight"]),
    "timm_resnet50.safetensors": (_write_timm_resnet_safetensors, "safetensors", "torchvision/timm ResNet",
                                  ["fc.bias", "fc.weight"]),
    "R-50.pkl": (_write_detectron2_pkl, "pickle", "detectron2 ResNet (R-50.pkl)",
                 ["stem.fc.bias", "stem.fc.weight"]),
    "hub_resnet": (_write_hub_directory, "Hub directory (config.json + safetensors)", "transformers ResNet",
                   ["classifier.1.bias", "classifier.1.weight"]),
}
SWIN_HEAD = ["head.bias", "head.weight", "norm.bias", "norm.weight"]
SWIN_FORMATS = {
    "swin_tiny_patch4_window7_224.pth": (_write_official_swin_pth, "torch zip", "official Swin", SWIN_HEAD),
    "swin_tiny_patch4_window7_224.pkl": (_write_authors_swin_pkl, "pickle", "official Swin", SWIN_HEAD),
    "timm_swin_tiny.safetensors": (_write_timm_swin_safetensors, "safetensors", "timm Swin",
                                   ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]),
    "hub_swin": (_write_hub_directory, "Hub directory (config.json + safetensors)", "transformers Swin",
                 ["classifier.bias", "classifier.weight", "swin.layernorm.bias", "swin.layernorm.weight"]),
}


def _reference_variables(arch):
  """The same weights through the existing transformers converter (tests/test_backbones.py)."""
  _, variables = convert_hf_backbone(arch.torch_backbone.config.to_dict(),
                                     torch_reference.state_dict_numpy(arch.torch_backbone))
  return variables


def _check_format(arch, formats, file_name, tmp_path):
  write, container, layout, head = formats[file_name]
  path = str(tmp_path / file_name)
  write(arch, path)
  variables, report = imagenet_backbone.convert_imagenet_backbone(path, arch.fresh)
  assert (report.container, report.layout, report.dropped) == (container, layout, head)
  assert all(name in report.summary() for name in head)
  errors = arch.relative_errors(variables)
  assert max(errors) < 1e-5, errors
  reference = _reference_variables(arch)
  jax.tree.map(np.testing.assert_array_equal, variables, {c: reference[c] for c in variables})
  return report


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("file_name", list(RESNET_FORMATS))
def test_resnet50_layouts_give_torch_feature_maps(r50, file_name, tmp_path):
  report = _check_format(r50, RESNET_FORMATS, file_name, tmp_path)
  assert report.loaded == 5 * (1 + 3 * 16 + 4)  # stem, 16 blocks of 3, 4 shortcuts: conv + 4 BN tensors
  assert report.kept_fresh == []


def test_detectron2_layout_has_the_authors_backbone_names_and_shapes(r50):
  """The R-50.pkl written here against the backbone of the authors' COCO R50 checkpoint."""
  authors = {}
  with open(torch_reference.AUTHORS_R50_KEYS) as f:
    for line in f:
      match = re.match(r"^backbone\.(\S+) \[([\d, ]*)\]$", line.strip())
      if match:
        authors[match.group(1)] = tuple(int(d) for d in match.group(2).split(","))
  written = _detectron2_names(_torchvision_names(r50.classifier.state_dict()))
  assert {k: v.shape for k, v in written.items()
          if not k.startswith("stem.fc.") and not k.endswith("num_batches_tracked")} == authors


@pytest.mark.parametrize("file_name", list(SWIN_FORMATS))
def test_swin_tiny_layouts_give_torch_feature_maps(swin_t, file_name, tmp_path):
  report = _check_format(swin_t, SWIN_FORMATS, file_name, tmp_path)
  assert report.kept_fresh == ["norm0", "norm1", "norm2", "norm3"]
  assert report.resized_tables == 0


def test_swin_window_7_checkpoint_into_window_12_resizes_tables_as_torch(swin_t, tmp_path):
  path = str(tmp_path / "swin_tiny_patch4_window7_224.pth")
  _write_official_swin_pth(swin_t, path)
  cfg = swin_backbone("tiny")
  cfg.window_size = 12
  module = build_backbone(cfg)
  fresh = _random_like(jax.eval_shape(lambda: module.init(jax.random.key(0), swin_t.x, train=False)), 0)
  variables, report = imagenet_backbone.convert_imagenet_backbone(path, fresh)
  assert report.resized_tables == sum(cfg.depths) and report.windows == (7, 12)
  assert "from window 7 to 12" in report.summary()
  tables = {k: v for k, v in swin_t.torch_backbone.state_dict().items() if k.endswith("bias_table")}
  assert len(tables) == sum(cfg.depths)
  for name, table in tables.items():
    stage, block = re.search(r"layers\.(\d)\.blocks\.(\d)", name).groups()
    heads = table.shape[1]
    resized = torch.nn.functional.interpolate(table.T.reshape(1, heads, 13, 13), size=(23, 23),
                                              mode="bicubic", align_corners=False)
    ours = variables["params"][f"layer{stage}"][f"block{block}"]["attn"]["relative_position_bias_table"]
    assert ours.shape == (23 * 23, heads)
    np.testing.assert_allclose(ours, resized.reshape(heads, -1).T.numpy(), rtol=1e-5, atol=1e-6)


def test_classification_head_is_dropped_and_logged(r50, tmp_path, caplog):
  path = str(tmp_path / "resnet50.pth")
  _write_torchvision_pth(r50, path)
  cfg = resnet_backbone(50)
  cfg.init_from = path
  with caplog.at_level("INFO"):
    variables = imagenet_backbone.load_imagenet_backbone(cfg, r50.fresh)
  assert "dropped classification head (2): fc.bias, fc.weight" in caplog.text
  assert "torch zip, torchvision/timm ResNet names; loaded 265 tensors" in caplog.text
  assert variables.keys() == r50.fresh.keys()


def test_unknown_and_surplus_names_fail_with_their_list(r50, tmp_path):
  state = _torchvision_names(r50.classifier.state_dict())
  state["layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)  # an R-101 block
  state["aux_head.weight"] = torch.zeros(3)
  del state["layer4.2.bn3.running_var"]
  path = str(tmp_path / "bad.pth")
  torch.save(state, path)
  with pytest.raises(ValueError) as error:
    imagenet_backbone.convert_imagenet_backbone(path, r50.fresh)
  message = str(error.value)
  assert "2 checkpoint tensors map to nothing in it: ['aux_head.weight', 'layer3.6.conv1.weight']" in message
  assert "1 backbone tensors are missing from the checkpoint" in message
  assert "encoder.stages.3.layers.2.layer.2.normalization.running_var" in message


def test_checkpoint_of_another_backbone_is_refused(swin_t, tmp_path):
  path = str(tmp_path / "resnet.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
             path)
  with pytest.raises(ValueError, match="holds a torchvision/timm ResNet backbone, but the config's backbone is swin"):
    imagenet_backbone.convert_imagenet_backbone(path, swin_t.fresh)


class _Payload:
  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pickle", "torch zip"])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(r50, tmp_path, container):
  marker = tmp_path / "payload_ran"
  state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "evil": _Payload(marker)}
  path = tmp_path / "resnet50.pth"
  if container == "pickle":
    path.write_bytes(pickle.dumps({"model": state}))
  else:
    torch.save({"model": state}, str(path))
  with pytest.raises(ValueError, match="refusing to load posix.system"):
    imagenet_backbone.convert_imagenet_backbone(str(path), r50.fresh)
  assert not marker.exists()
  if container == "pickle":  # the same bytes do run the payload when unpickled blindly
    pickle.loads(path.read_bytes())
  else:
    torch.load(str(path), weights_only=False)
  assert marker.exists()


class _OverrunningTensor:
  """Pickles as a 100-element tensor view of a 4-element storage (reading past it)."""

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, (torch.zeros(4).storage(), 0, (100,), (1,), False, {})  # pylint: disable=protected-access


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_tensor_reading_past_its_storage_is_refused(r50, tmp_path):
  path = tmp_path / "overrun.pkl"
  path.write_bytes(pickle.dumps({"model": {"conv1.weight": _OverrunningTensor()}}))
  with pytest.raises(ValueError, match=r"tensor of size \(100,\) at offset 0 overruns its storage of 4"):
    imagenet_backbone.convert_imagenet_backbone(str(path), r50.fresh)


_READ_WITHOUT_TORCH = """
import json
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from m2f_jax.convert import weight_files
expected, dtypes = np.load(sys.argv[1]), json.loads(sys.argv[2])
for path in sys.argv[3:]:
  arrays = weight_files.read_weight_file(path).arrays
  assert sorted(arrays) == sorted(expected.files), (path, sorted(arrays))
  for name in expected.files:
    assert arrays[name].dtype.name == dtypes[name], (path, name, arrays[name].dtype)
    np.testing.assert_array_equal(arrays[name].astype(np.float32), expected[name])
print("read", len(sys.argv) - 3, "files without torch")
"""


def test_torch_files_and_tensor_pickles_are_read_without_torch(tmp_path):
  """Zip and legacy torch.save files and pickled tensors need no torch: tensors come back as numpy,
  views (a transposed tensor, a slice at an offset) and bfloat16 included."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {"conv1.weight": base.t(), "bn1.bias": base[1, 2:5], "bn1.num_batches_tracked": torch.tensor(3),
           "fc.weight": torch.randn(3, 2).to(torch.bfloat16), "fc.bias": torch.zeros(0)}
  np.savez(tmp_path / "expected.npz", **{k: v.float().numpy() for k, v in state.items()})
  dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
  torch.save({"model": state}, tmp_path / "zip.pth")
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  (tmp_path / "tensors.pkl").write_bytes(pickle.dumps({"model": state}))
  files = [str(tmp_path / n) for n in ("zip.pth", "legacy.pth", "tensors.pkl")]
  result = subprocess.run([sys.executable, "-c", _READ_WITHOUT_TORCH, str(tmp_path / "expected.npz"),
                           json.dumps(dtypes), *files],
                          capture_output=True, text=True, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "read 3 files without torch" in result.stdout


def test_fresh_training_state_has_exactly_the_imagenet_backbone(tmp_path):
  """loop._initial_state (what train.py runs) with model.backbone.init_from and no checkpoint."""
  from test_training import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config()
  small_resnet = dict(embedding_size=16, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
                      layer_type="bottleneck", downsample_in_bottleneck=False)
  classifier, backbone = _classifier_and_backbone("resnet", small_resnet, seed=4)
  path = str(tmp_path / "resnet14.pth")
  torch.save(_torchvision_names(classifier.state_dict()), path)
  mesh = parallel.make_mesh()
  model = build_model(cfg)
  tx, _ = optimizer.build_optimizer(cfg)
  key = jax.random.key(cfg.seed)

  def initial_state(init_from, workdir):
    cfg.model.backbone.init_from = init_from
    return jax.device_get(loop._initial_state(cfg, model, tx, mesh, checkpointing.Checkpointer(workdir, 1), key))

  plain = initial_state(None, str(tmp_path / "plain"))
  loaded = initial_state(path, str(tmp_path / "loaded"))
  _, expected = convert_hf_backbone(backbone.config.to_dict(), torch_reference.state_dict_numpy(backbone))
  for collection in ("params", "batch_stats"):
    ours, fresh = getattr(loaded, collection), getattr(plain, collection)
    jax.tree.map(np.testing.assert_array_equal, ours["backbone"], expected[collection])
    others = {k: v for k, v in ours.items() if k != "backbone"}
    jax.tree.map(np.testing.assert_array_equal, others, {k: v for k, v in fresh.items() if k != "backbone"})
  assert not np.allclose(plain.params["backbone"]["stem"]["conv1"]["kernel"],
                         loaded.params["backbone"]["stem"]["conv1"]["kernel"])
