"""Writes small data sets in the three formats of configs/custom.py, with odd category ids.

Scene of every image (H x W): 'grass' (stuff) over the top rows, a 'cat' rectangle, a crowd of
'dogs', void elsewhere; in the instance format a second cat overlaps the first.
"""
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

H, W = 40, 56
CAT, DOG, GRASS = 7, 12, 40                 # the data set's own ids; contiguous 0, 1, 2
CATEGORIES = [{"id": CAT, "name": "cat", "isthing": 1}, {"id": GRASS, "name": "grass", "isthing": 0},
              {"id": DOG, "name": "dog", "isthing": 1}]     # unsorted on purpose
NAMES = ("cat", "dog", "grass")
CAT_SEG, CROWD_SEG, GRASS_SEG = 70001, 300, 5   # panoptic segment ids (multi-byte)


def scene(shift: int = 0) -> dict:
  """Boolean masks [H, W] of the scene; `shift` moves the things."""
  masks = {k: np.zeros((H, W), bool) for k in ("grass", "cat", "crowd", "cat2")}
  masks["grass"][:12] = True
  masks["cat"][16 + shift:32 + shift, 4:20] = True
  masks["crowd"][20:36, 34:50] = True
  masks["cat2"][24 + shift:38 + shift, 12:28] = True   # overlaps the cat (instance format only)
  return masks


def _image(path: str, seed: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
  pixels[scene(seed % 3)["cat"]] = (220, 120, 40)   # learnable colours
  pixels[scene()["grass"]] = (40, 160, 60)
  Image.fromarray(pixels).save(path)


def _id_to_rgb(ids: np.ndarray) -> np.ndarray:
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _box(mask: np.ndarray) -> list:
  ys, xs = np.nonzero(mask)
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _rle(mask: np.ndarray) -> dict:
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": [H, W], "counts": rle["counts"].decode()}


def _polygon(mask: np.ndarray) -> list:
  x, y, w, h = _box(mask)
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def write_coco_panoptic(root: str, train_ids=(11, 12, 13), val_ids=(21, 22)) -> dict:
  """Panoptic JSON + PNGs + JPEG images per split; train image 13 has no segments.

  Returns the cfg.data.custom keys.
  """
  keys = {"format": "coco_panoptic"}
  for prefix, image_ids in (("train", train_ids), ("val", val_ids)):
    image_dir, png_dir = os.path.join(root, prefix, "images"), os.path.join(root, prefix, "png")
    os.makedirs(png_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in image_ids:
      name = f"img{image_id}"
      _image(os.path.join(image_dir, name + ".jpg"), image_id)
      images.append({"id": image_id, "file_name": name + ".jpg", "height": H, "width": W})
      masks = scene(image_id % 3)
      ids = np.zeros((H, W), np.int64)
      segments = []
      if image_id != 13:
        for seg_id, key, cat, crowd in ((GRASS_SEG, "grass", GRASS, 0), (CAT_SEG, "cat", CAT, 0),
                                        (CROWD_SEG, "crowd", DOG, 1)):
          ids[masks[key]] = seg_id
          segments.append({"id": seg_id, "category_id": cat, "iscrowd": crowd,
                           "area": int(masks[key].sum()), "bbox": _box(masks[key])})
      Image.fromarray(_id_to_rgb(ids)).save(os.path.join(png_dir, name + ".png"))
      annotations.append({"image_id": image_id, "file_name": name + ".png",
                          "segments_info": segments})
    json_path = os.path.join(root, prefix, "panoptic.json")
    with open(json_path, "w") as f:
      json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    keys.update({f"{prefix}_images": image_dir, f"{prefix}_annotations": json_path,
                 f"{prefix}_panoptic_masks": png_dir})
  return keys


def write_coco_instance(root: str) -> dict:
  """Instance JSON (polygon cat, RLE cat overlapping it, RLE crowd of dogs) + images."""
  keys = {"format": "coco_instance"}
  for prefix, image_ids in (("train", (11, 12)), ("val", (21,))):
    image_dir = os.path.join(root, prefix, "images")
    images, annotations = [], []
    for image_id in image_ids:
      name = f"img{image_id}.png"
      _image(os.path.join(image_dir, name), image_id)
      images.append({"id": image_id, "file_name": name, "height": H, "width": W})
      masks = scene(image_id % 3)
      for k, (key, cat, crowd) in enumerate((("cat", CAT, 0), ("cat2", CAT, 0),
                                             ("crowd", DOG, 1))):
        segmentation = _polygon(masks[key]) if key == "cat" else _rle(masks[key])
        annotations.append({"id": 100 * image_id + k, "image_id": image_id, "category_id": cat,
                            "iscrowd": crowd, "segmentation": segmentation,
                            "area": float(masks[key].sum()), "bbox": _box(masks[key])})
    json_path = os.path.join(root, prefix, "instances.json")
    with open(json_path, "w") as f:
      json.dump({"images": images, "annotations": annotations,
                 "categories": [c for c in CATEGORIES if c["isthing"]]}, f)
    keys.update({f"{prefix}_images": image_dir, f"{prefix}_annotations": json_path})
  return keys


def semantic_label(shift: int = 0) -> np.ndarray:
  """Class-index map [H, W] uint8: grass 2, cat 0, dog 1, 255 elsewhere."""
  masks = scene(shift)
  label = np.full((H, W), 255, np.uint8)
  label[masks["grass"]] = 2
  label[masks["cat"]] = 0
  label[masks["crowd"]] = 1
  return label


def write_semantic_png(root: str) -> dict:
  """Label PNGs (value = class index, 255 ignore), images of the same stems, a classes file."""
  keys = {"format": "semantic_png", "classes": os.path.join(root, "classes.txt")}
  os.makedirs(root, exist_ok=True)
  with open(keys["classes"], "w") as f:
    f.write("\n".join(NAMES) + "\n")
  for prefix, stems in (("train", ("a", "b")), ("val", ("c",))):
    image_dir, label_dir = os.path.join(root, prefix, "images"), os.path.join(root, prefix, "labels")
    os.makedirs(label_dir, exist_ok=True)
    for i, stem in enumerate(stems):
      _image(os.path.join(image_dir, stem + ".jpg"), i)
      Image.fromarray(semantic_label(i)).save(os.path.join(label_dir, stem + ".png"))
    keys.update({f"{prefix}_images": image_dir, f"{prefix}_annotations": label_dir})
  return keys
