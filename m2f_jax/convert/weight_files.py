"""A weights file or Hub directory -> {name: numpy array}, the container told from the bytes.

Containers: safetensors; torch zip (`torch.save`, e.g. torchvision and the official Swin `.pth`);
legacy `torch.save`; plain pickles (detectron2's `R-50.pkl`, the authors' Swin `.pkl`); a
transformers Hub directory (config.json + model.safetensors or its sharded index). Pickled
files go through `safe_pickle`, which runs no code from the file and needs no torch.
"""
import dataclasses
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional

import numpy as np
from safetensors.numpy import load_file

from m2f_jax.convert import safe_pickle

WRAPPER_KEYS = ("model", "state_dict")  # {'model': state dict} (official Swin, detectron2), Lightning


@dataclasses.dataclass
class WeightFile:
  """What a weights file holds.

  Attributes:
    container: how it was stored, e.g. 'torch zip', 'safetensors', 'pickle'.
    arrays: tensor name -> numpy array.
    hub_config: the config.json of a Hub directory, else None.
  """
  container: str
  arrays: Dict[str, np.ndarray]
  hub_config: Optional[Dict[str, Any]] = None


def _is_safetensors(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (header_size,) = struct.unpack("<Q", head[:8])
  return head[8:9] == b"{" and header_size <= os.path.getsize(path) - 8


def _first_bytes(path: str, n: int) -> bytes:
  with open(path, "rb") as f:
    return f.read(n)


def _state_dict(obj: Any, path: str) -> Dict[str, np.ndarray]:
  """The {name: array} inside a loaded object, unwrapping {'model': ...} / {'state_dict': ...}."""
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: entries that are not name -> tensor: {bad[:10]}; pass a state dict "
                     "or a {'model': state dict} checkpoint")
  return dict(obj)


def _hub_directory(path: str) -> WeightFile:
  config_path = os.path.join(path, "config.json")
  single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
  if not os.path.isfile(config_path) or not (os.path.isfile(single) or os.path.isfile(index)):
    raise FileNotFoundError(f"{path} is a directory but not a Hub model directory: it needs "
                            "config.json and model.safetensors (or model.safetensors.index.json)")
  with open(config_path) as f:
    config = json.load(f)
  if os.path.isfile(single):
    arrays = load_file(single)
  else:
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    arrays = {}
    for shard in shards:
      arrays.update(load_file(os.path.join(path, shard)))
  return WeightFile("Hub directory (config.json + safetensors)", arrays, config)


def read_weight_file(path: str) -> WeightFile:
  """Reads `path` (a file or a Hub directory) in whichever container it is.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: an unknown container, a pickle that would run code, or no state dict inside.
  """
  if os.path.isdir(path):
    return _hub_directory(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no weights file at {path}")
  if _is_safetensors(path):
    return WeightFile("safetensors", load_file(path))
  legacy_magic = pickle.dumps(safe_pickle.LEGACY_MAGIC, protocol=2)  # what torch.save writes first
  if zipfile.is_zipfile(path):
    container = "torch zip"
  elif _first_bytes(path, len(legacy_magic)) == legacy_magic:
    container = "legacy torch.save"
  elif _first_bytes(path, 1) == b"\x80":  # PROTO opcode, pickle protocol 2 and later
    container = "pickle"
  else:
    raise ValueError(f"{path} is neither safetensors, a torch file, a pickle nor a Hub directory")
  obj = safe_pickle.load_checkpoint_object(path)
  return WeightFile(container, _state_dict(obj, path))
