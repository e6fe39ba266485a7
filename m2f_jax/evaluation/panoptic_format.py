"""COCO panoptic format: segment-id PNGs (id = R + 256 G + 256^2 B) and their JSON files."""
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
  """int [H, W] segment ids -> uint8 [H, W, 3]."""
  id_map = np.asarray(id_map, np.int64)
  if id_map.min(initial=0) < 0 or id_map.max(initial=0) >= 256 ** 3:
    raise ValueError("segment ids must lie in 0..256^3-1 to fit a COCO panoptic PNG")
  return np.stack([id_map % 256, id_map // 256 % 256, id_map // 256 ** 2], -1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> int32 [H, W] segment ids."""
  rgb = np.asarray(rgb, np.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def read_id_png(path: str) -> np.ndarray:
  """int32 [H, W] segment ids of a COCO panoptic PNG."""
  try:
    with Image.open(path) as image:
      rgb = np.asarray(image.convert("RGB"))
  except (OSError, ValueError) as e:
    raise OSError(f"cannot read panoptic PNG {path}: {e}") from e
  return rgb_to_id(rgb)


def write_id_png(path: str, id_map: np.ndarray) -> None:
  Image.fromarray(id_to_rgb(id_map)).save(path)


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise OSError(f"cannot read JSON file {path}: {e}") from e


def annotation(image_id, file_name: str, segments: Sequence[dict], category_ids: Sequence[int]) -> dict:
  """A COCO panoptic annotation; `category_ids` maps contiguous class k to the data set's id."""
  return dict(image_id=image_id, file_name=file_name, segments_info=[
      dict(id=int(s["id"]), category_id=int(category_ids[s["category_id"]]),
           isthing=int(bool(s["isthing"])), **({"score": float(s["score"])} if "score" in s else {}))
      for s in segments])


def write_predictions(out_dir: str, annotations: Sequence[dict], categories: Sequence[dict]) -> str:
  """Writes OUT/panoptic.json ({'annotations', 'categories'}) beside the PNGs; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "panoptic.json")
  with open(path, "w") as f:
    json.dump(dict(annotations=list(annotations), categories=list(categories)), f)
  return path
