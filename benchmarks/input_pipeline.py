"""Input pipeline throughput: COCO LSJ-1024 and ADE20K-512 training batches on this machine.

Writes fixture data in the official layouts (COCO 2017 panoptic: 640x480 JPEGs with panoptic
PNGs and ~12 segments; ADE20K: 683x512 JPEGs with semantic PNGs), builds the tfds data sets and
times `train_iterator` with 1 and 2 parallel calls of the per-example map.

  .venv/bin/python benchmarks/input_pipeline.py [--images 64] [--batches 6]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import ade20k_semantic_r50  # pylint: disable=g-import-not-at-top
from configs import coco_panoptic_r50
from m2f_jax import data
from m2f_jax.data import categories


def _scene(rng, h, w, n):
  """A random image [h, w, 3] and a label map [h, w] of n rectangles on a background."""
  image = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  label = np.zeros((h, w), np.int64)
  for k in range(1, n + 1):
    y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
    label[y:y + rng.integers(20, h - y), x:x + rng.integers(20, w - x)] = k
  return image, label


def write_coco(root, count, rng):
  cats = [{"id": i, "name": n, "isthing": t} for i, n, t in categories.COCO_PANOPTIC]
  os.makedirs(os.path.join(root, "annotations", "panoptic_train2017"))
  os.makedirs(os.path.join(root, "train2017"))
  images, anns = [], []
  for i in range(1, count + 1):
    image, label = _scene(rng, 480, 640, 12)
    Image.fromarray(image).save(os.path.join(root, "train2017", f"{i:012d}.jpg"), quality=90)
    seg_ids = label * 1000 + 1
    seg_ids[label == 0] = 0
    rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(os.path.join(root, "annotations", "panoptic_train2017",
                                           f"{i:012d}.png"))
    segments = [{"id": int(k * 1000 + 1), "category_id": cats[int(rng.integers(133))]["id"],
                 "iscrowd": 0, "area": int((label == k).sum()), "bbox": [0, 0, 1, 1]}
                for k in np.unique(label) if k]
    images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640})
    anns.append({"image_id": i, "file_name": f"{i:012d}.png", "segments_info": segments})
  for split in ("train", "val"):
    with open(os.path.join(root, "annotations", f"panoptic_{split}2017.json"), "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  os.symlink(os.path.join(root, "annotations", "panoptic_train2017"),
             os.path.join(root, "annotations", "panoptic_val2017"))
  os.symlink(os.path.join(root, "train2017"), os.path.join(root, "val2017"))


def write_ade20k(root, count, rng):
  base = os.path.join(root, "ADEChallengeData2016")
  for folder in ("training", "validation"):
    os.makedirs(os.path.join(base, "images", folder))
    os.makedirs(os.path.join(base, "annotations", folder))
    for i in range(1, count + 1):
      image, label = _scene(rng, 512, 683, 10)
      label = np.where(label > 0, rng.integers(1, 151, 11)[label], 0).astype(np.uint8)
      name = f"ADE_{folder[:5]}_{i:08d}"
      Image.fromarray(image).save(os.path.join(base, "images", folder, name + ".jpg"), quality=90)
      Image.fromarray(label).save(os.path.join(base, "annotations", folder, name + ".png"))


def measure(cfg, batches):
  it = data.train_iterator(cfg)
  next(it)                                   # warm-up: graph tracing, first buffers
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batches", type=int, default=6)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    write_coco(os.path.join(tmp, "coco"), args.images, rng)
    write_ade20k(os.path.join(tmp, "ade"), args.images, rng)
    setups = [("COCO panoptic LSJ 1024x1024", coco_panoptic_r50.get_config(), "coco"),
              ("ADE20K semantic 512x512", ade20k_semantic_r50.get_config(), "ade")]
    print(f"{os.cpu_count()} CPUs; batch 16; {args.batches} batches after one warm-up batch")
    for title, cfg, folder in setups:
      cfg.data.manual_dir = os.path.join(tmp, folder)
      cfg.data.data_dir = os.path.join(tmp, "tfds")
      cfg.data.shuffle_buffer = args.images
      start = time.perf_counter()
      data.get_builder(cfg.data)
      print(f"{title}: built {args.images} images in {time.perf_counter() - start:.1f} s")
      for calls in (1, 2):
        cfg.data.num_parallel_calls = calls
        print(f"  {calls} parallel call(s): {measure(cfg, args.batches):6.1f} images/s")


if __name__ == "__main__":
  main()
