"""The one example format every builder of this package writes, and helpers to fill it.

An example holds the image as its original encoded bytes and the annotation as segment-index
layers: `layers` [S0, H, W] uint16 PNGs where value i + 1 marks segment i of `segments` (0 = no
segment: void, ignore or unlabelled). Segments of one layer never overlap; overlapping instance
masks (COCO instance) go to different layers, assigned greedily from the largest mask down, so
the masks are kept exact whatever their overlap. Panoptic and semantic data sets need one layer.
One format for every data set lets one tf.data pipeline serve them all.
"""
import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

MAX_SEGMENTS = np.iinfo(np.uint16).max


def features() -> tfds.features.FeaturesDict:
  """The tfds features of an example (see the module docstring)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "file_name": tfds.features.Text(),
      "layers": tfds.features.Sequence(
          tfds.features.Image(shape=(None, None, 1), dtype=np.uint16)),
      "segments": tfds.features.Sequence({
          "id": np.int64,            # panoptic segment id or annotation id
          "category_id": np.int32,   # contiguous 0..K-1
          "iscrowd": np.int32,
          "layer": np.int32,         # index into `layers`
          "area": np.float32,        # annotated area (COCO evaluation uses it for area ranges)
          "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),  # x, y, w, h
      }),
  })


def read_image_bytes(path) -> tuple[bytes, tuple[int, int]]:
  """Encoded bytes and (height, width) of an image file; raises naming the file if corrupt."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      size = im.size
      im.verify()
  except FileNotFoundError:
    raise FileNotFoundError(f"Image file missing: {path}") from None
  except Exception as e:  # PIL raises many types for broken files.
    raise ValueError(f"Corrupt or unreadable image file {path}: {e}") from e
  return data, (size[1], size[0])


def read_png(path) -> np.ndarray:
  """Decoded PNG as a numpy array; raises naming the file if it is missing or corrupt."""
  try:
    with Image.open(path) as im:
      return np.asarray(im)
  except FileNotFoundError:
    raise FileNotFoundError(f"Annotation PNG missing: {path}") from None
  except Exception as e:
    raise ValueError(f"Corrupt or unreadable annotation PNG {path}: {e}") from e


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
  """COCO panoptic PNG [H, W, 3] uint8 -> segment ids [H, W] int64 (R + 256 G + 256^2 B)."""
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def mask_bbox(mask: np.ndarray) -> list[float]:
  """Tight box [x, y, w, h] of a boolean mask [H, W] (zeros when empty)."""
  ys, xs = np.nonzero(mask)
  if ys.size == 0:
    return [0.0, 0.0, 0.0, 0.0]
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
          float(ys.max() - ys.min() + 1)]


def semantic_segments(label: np.ndarray) -> tuple[np.ndarray, list[dict]]:
  """Semantic map [H, W] of class ids (255 = ignore) -> (index map uint16 [H, W], one segment per class)."""
  index_map = np.zeros(label.shape, np.uint16)
  segments = []
  for cls in np.unique(label):
    if cls == 255:
      continue
    mask = label == cls
    segments.append(dict(id=int(cls) + 1, category_id=int(cls), area=float(mask.sum()),
                         bbox=mask_bbox(mask)))
    index_map[mask] = len(segments)
  return index_map, segments


def semantic_example(image_path: str, label: np.ndarray, label_path: str, image_id: int) -> dict:
  """Example of an image file and its class map [H, W] (255 = ignore) read from `label_path`.

  One segment per class present, as the authors' semantic mapper; raises naming both files when
  their sizes differ.
  """
  image_bytes, size = read_image_bytes(image_path)
  if size != label.shape:
    raise ValueError(f"{label_path} is {label.shape}, its image {image_path} is {size}")
  index_map, segments = semantic_segments(label)
  return make_example(image_bytes, image_id, os.path.basename(image_path), [index_map], segments)


def index_map_from_ids(id_map: np.ndarray, segment_ids, where: str) -> np.ndarray:
  """Segment-id map [H, W] -> index map [H, W] uint16 (i + 1 for segment_ids[i], 0 for id 0).

  Raises ValueError naming `where` when the map holds an id absent from `segment_ids`.
  """
  unique, inverse = np.unique(id_map, return_inverse=True)
  lookup = {int(s): i + 1 for i, s in enumerate(segment_ids)}
  lookup.setdefault(0, 0)
  missing = [int(u) for u in unique if int(u) not in lookup]
  if missing:
    raise ValueError(f"{where}: segment ids {missing[:10]} appear in the PNG but not in the "
                     "annotation's segments_info")
  table = np.array([lookup[int(u)] for u in unique], dtype=np.uint16)
  return table[inverse.reshape(id_map.shape)]


def assign_layers(masks: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
  """Greedily packs possibly overlapping masks into non-overlapping index layers.

  Masks are visited from the largest down; each goes to the first layer where it overlaps no
  earlier mask. So when a consumer keeps only the first S layers, the masks it loses are the
  smaller members of overlapping groups.

  Args:
    masks: N boolean masks [H, W].

  Returns:
    (layers, layer_of): layers [H, W] uint16 with value i + 1 for mask i, and mask i's layer.
  """
  if len(masks) > MAX_SEGMENTS:
    raise ValueError(f"{len(masks)} segments in one image exceed the limit of {MAX_SEGMENTS}")
  if not masks:
    return [], []
  shape = masks[0].shape
  layers: list[np.ndarray] = []
  layer_of = [0] * len(masks)
  order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
  for i in order:
    for k, layer in enumerate(layers):
      if not np.any(layer[masks[i]]):
        break
    else:
      layers.append(np.zeros(shape, np.uint16))
      k = len(layers) - 1
    layers[k][masks[i]] = i + 1
    layer_of[i] = k
  return layers, layer_of


def make_example(image, image_id: int, file_name: str, layers: list[np.ndarray],
                 segments: list[dict]) -> dict:
  """A feature dict for `features()`; `segments` dicts carry id, category_id, iscrowd, layer,
  area and bbox; `layers` are [H, W] uint16 index maps (at least one, also for empty images)."""
  return {
      "image": image,
      "image_id": int(image_id),
      "file_name": file_name,
      "layers": [l[..., None] for l in layers],
      "segments": {
          "id": np.array([s["id"] for s in segments], np.int64),
          "category_id": np.array([s["category_id"] for s in segments], np.int32),
          "iscrowd": np.array([s.get("iscrowd", 0) for s in segments], np.int32),
          "layer": np.array([s.get("layer", 0) for s in segments], np.int32),
          "area": np.array([s["area"] for s in segments], np.float32),
          "bbox": np.array([s["bbox"] for s in segments], np.float32).reshape(-1, 4),
      },
  }
