"""COCO 2017 panoptic and instance builders (official layout, read offline from a manual dir).

Also provides the reader of COCO-panoptic-format annotations (JSON + PNG), which the ADE20K
panoptic builder reuses. Train splits skip images without any segment (counted and logged, as
the authors filter them); validation splits keep them.
"""
import collections
import functools
import json
import os

import numpy as np
from pycocotools import mask as mask_util

from m2f_jax.data import builders_base
from m2f_jax.data import example_format
from m2f_jax.data import info as info_lib


def _load_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"Annotation file missing: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"Annotation file {path} is not valid JSON: {e}") from e


def contiguous_categories(data: dict, expected: int, where: str) -> dict[int, int]:
  """Original category id -> 0..K-1 in sorted id order; raises if K != expected."""
  ids = sorted(int(c["id"]) for c in data.get("categories", []))
  if len(ids) != expected:
    raise ValueError(f"{where}: {len(ids)} categories in the JSON, expected {expected}")
  return {cid: i for i, cid in enumerate(ids)}


def _checked_image(image_dir: str, image: dict, where: str) -> bytes:
  path = os.path.join(image_dir, image["file_name"])
  data, size = example_format.read_image_bytes(path)
  if "height" in image and size != (image["height"], image["width"]):
    raise ValueError(f"{path}: image is {size[0]}x{size[1]} but {where} says "
                     f"{image['height']}x{image['width']}")
  return data


def generate_panoptic(json_path: str, png_dir: str, image_dir: str, num_classes: int,
                      skip_empty: bool):
  """Yields examples of a COCO-panoptic-format split (JSON with segments_info + id PNGs)."""
  data = _load_json(json_path)
  to_contiguous = contiguous_categories(data, num_classes, json_path)
  images = {im["id"]: im for im in data.get("images", [])}
  skipped = builders_base.SkipCounter(json_path, "no segments")
  for ann in sorted(data.get("annotations", []), key=lambda a: a["image_id"]):
    if ann["image_id"] not in images:
      raise ValueError(f"{json_path}: annotation {ann['file_name']} refers to image id "
                       f"{ann['image_id']}, which is not in 'images'")
    image = images[ann["image_id"]]
    segments_info = ann.get("segments_info", [])
    if not segments_info and skip_empty:
      skipped.add()
      continue
    image_bytes = _checked_image(image_dir, image, json_path)
    png_path = os.path.join(png_dir, ann["file_name"])
    png = example_format.read_png(png_path)
    if png.ndim != 3 or png.shape[2] < 3:
      raise ValueError(f"{png_path}: panoptic PNG must be RGB, got shape {png.shape}")
    if png.shape[:2] != (image["height"], image["width"]):
      raise ValueError(f"{png_path}: PNG is {png.shape[0]}x{png.shape[1]}, image "
                       f"{image['file_name']} is {image['height']}x{image['width']}")
    segments = []
    for s in segments_info:
      if s["category_id"] not in to_contiguous:
        raise ValueError(f"{json_path}: segment {s['id']} of {ann['file_name']} has unknown "
                         f"category_id {s['category_id']}")
      segments.append(dict(id=s["id"], category_id=to_contiguous[s["category_id"]],
                           iscrowd=s.get("iscrowd", 0), area=s["area"], bbox=s["bbox"]))
    index_map = example_format.index_map_from_ids(
        example_format.rgb_to_panoptic_id(png[..., :3]), [s["id"] for s in segments], png_path)
    yield ann["image_id"], example_format.make_example(
        image_bytes, ann["image_id"], image["file_name"], [index_map], segments)
  skipped.log()


def _annotation_mask(ann: dict, height: int, width: int, where: str) -> np.ndarray:
  """Boolean mask [H, W] of a COCO annotation (polygons, uncompressed or compressed RLE)."""
  seg = ann.get("segmentation")
  if isinstance(seg, list):
    polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    if not polygons:
      raise ValueError(f"{where}: annotation {ann['id']} has no valid polygon")
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
  elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
    rle = mask_util.frPyObjects(seg, height, width)
  elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
    counts = seg["counts"]
    rle = dict(size=seg["size"], counts=counts.encode() if isinstance(counts, str) else counts)
  else:
    raise ValueError(f"{where}: annotation {ann.get('id')} has no usable 'segmentation'")
  if list(rle["size"]) != [height, width]:
    raise ValueError(f"{where}: annotation {ann['id']} mask size {rle['size']} differs from "
                     f"its image {height}x{width}")
  return mask_util.decode(rle).astype(bool)


def generate_instances(json_path: str, image_dir: str, num_classes: int, skip_empty: bool):
  """Yields examples of a COCO instance split; overlapping masks kept exact in several layers."""
  data = _load_json(json_path)
  to_contiguous = contiguous_categories(data, num_classes, json_path)
  images = {im["id"]: im for im in data.get("images", [])}
  per_image = collections.defaultdict(list)
  for ann in data.get("annotations", []):
    if ann["image_id"] not in images:
      raise ValueError(f"{json_path}: annotation {ann['id']} refers to image id "
                       f"{ann['image_id']}, which is not in 'images'")
    if ann["category_id"] not in to_contiguous:
      raise ValueError(f"{json_path}: annotation {ann['id']} has unknown category_id "
                       f"{ann['category_id']}")
    per_image[ann["image_id"]].append(ann)
  skipped = builders_base.SkipCounter(json_path, "no annotations")
  for image_id in sorted(images):
    image, anns = images[image_id], per_image[image_id]
    if not anns and skip_empty:
      skipped.add()
      continue
    image_bytes = _checked_image(image_dir, image, json_path)
    h, w = image["height"], image["width"]
    masks = [_annotation_mask(a, h, w, json_path) for a in anns]
    layers, layer_of = example_format.assign_layers(masks)
    segments = [dict(id=a["id"], category_id=to_contiguous[a["category_id"]],
                     iscrowd=a.get("iscrowd", 0), layer=layer_of[i], area=a["area"],
                     bbox=a["bbox"]) for i, a in enumerate(anns)]
    yield image_id, example_format.make_example(
        image_bytes, image_id, image["file_name"], layers or [np.zeros((h, w), np.uint16)],
        segments)
  skipped.log()


_COCO_LAYOUT = """manual_dir/
  train2017/*.jpg  val2017/*.jpg
  annotations/panoptic_{train,val}2017.json
  annotations/panoptic_{train,val}2017/*.png   (or panoptic_{train,val}2017/*.png)
  annotations/instances_{train,val}2017.json
(a split whose files are missing is left out: validation alone can be evaluated)"""
_SPLITS = (("train", "train2017"), ("validation", "val2017"))


class M2fCocoPanoptic(builders_base.ManualBuilder):
  """COCO 2017 panoptic (133 classes)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _COCO_LAYOUT

  def _split_generators(self, dl_manager):
    k = info_lib.dataset_info_by_name("coco_panoptic").num_classes

    def split_examples(split, name):
      json_path = self._manual_path(dl_manager, f"annotations/panoptic_{name}.json")
      png_dir = self._manual_path(dl_manager, f"annotations/panoptic_{name}", f"panoptic_{name}")
      image_dir = self._manual_path(dl_manager, name)
      return self._generate_examples(json_path, png_dir, image_dir, k, split == "train")

    return self._splits_on_disk({split: functools.partial(split_examples, split, name)
                                 for split, name in _SPLITS})

  def _generate_examples(self, *args):
    return generate_panoptic(*args)


class M2fCocoInstance(builders_base.ManualBuilder):
  """COCO 2017 instance segmentation (80 classes)."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _COCO_LAYOUT

  def _split_generators(self, dl_manager):
    k = info_lib.dataset_info_by_name("coco_instance").num_classes

    def split_examples(split, name):
      json_path = self._manual_path(dl_manager, f"annotations/instances_{name}.json")
      image_dir = self._manual_path(dl_manager, name)
      return self._generate_examples(json_path, image_dir, k, split == "train")

    return self._splits_on_disk({split: functools.partial(split_examples, split, name)
                                 for split, name in _SPLITS})

  def _generate_examples(self, *args):
    return generate_instances(*args)
