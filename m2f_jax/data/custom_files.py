"""Your own data set on disk (`cfg.data.custom`): which files, their categories, their fingerprint.

Keys of `cfg.data.custom` (paths; a split is present when its keys are set):
  format                'coco_panoptic' | 'coco_instance' | 'semantic_png'
  train_images          image directory
  train_annotations     the JSON (coco_*), or the label PNG directory (semantic_png)
  train_panoptic_masks  the panoptic PNG directory (coco_panoptic only)
  val_images, val_annotations, val_panoptic_masks   the same for the validation split
  classes               semantic_png only: a text file, one class name a line (line i = value i)

Categories come from the data: the JSON's `categories` (any ids; contiguous index = rank of the
id, `isthing` for panoptic), or the classes file (index = PNG value). `model.num_classes` follows
them (`resolve_num_classes`).
"""
import dataclasses
import hashlib
import json
import os
from typing import Optional

import numpy as np

from m2f_jax.data import info as info_lib

FORMATS = {"coco_panoptic": "panoptic", "coco_instance": "instance", "semantic_png": "semantic"}
SPLITS = (("train", "train"), ("validation", "val"))   # tfds split, key prefix
# The semantic ground truth is 8-bit with 255 = ignore.
MAX_SEMANTIC_CLASSES = 255


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """The files of one split (absolute paths; panoptic_masks only for coco_panoptic)."""
  images: str
  annotations: str
  panoptic_masks: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Categories:
  """Classes in contiguous order 0..K-1, with the data set's own id, name and thing flag."""
  ids: tuple[int, ...]
  names: tuple[str, ...]
  is_thing: tuple[bool, ...]
  source: str   # the file they were read from


def _key(custom_cfg, name: str) -> Optional[str]:
  value = custom_cfg.get(name, None)
  return None if value in (None, "") else str(value)


def check_format(custom_cfg) -> str:
  fmt = _key(custom_cfg, "format")
  if fmt not in FORMATS:
    raise ValueError(f"config.data.custom.format must be one of {sorted(FORMATS)}, got {fmt!r}")
  return fmt


def split_files(custom_cfg) -> dict[str, SplitFiles]:
  """tfds split name -> its files, for every split whose keys are set; checks that they exist."""
  fmt = check_format(custom_cfg)
  wanted = ["images", "annotations"] + (["panoptic_masks"] if fmt == "coco_panoptic" else [])
  splits = {}
  for split, prefix in SPLITS:
    if fmt != "coco_panoptic" and _key(custom_cfg, f"{prefix}_panoptic_masks"):
      raise ValueError(f"config.data.custom.{prefix}_panoptic_masks is for format "
                       f"'coco_panoptic' only (format is {fmt!r})")
    values = {w: _key(custom_cfg, f"{prefix}_{w}") for w in wanted}
    if not any(values.values()):
      continue
    unset = [f"config.data.custom.{prefix}_{w}" for w, v in values.items() if v is None]
    if unset:
      raise ValueError(f"{', '.join(unset)} not set; format {fmt!r} needs "
                       f"{', '.join(f'{prefix}_{w}' for w in wanted)} for the {split} split")
    for w, path in values.items():
      is_dir = w != "annotations" or fmt == "semantic_png"
      if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
        raise FileNotFoundError(f"config.data.custom.{prefix}_{w}={path!r} is not an existing "
                                f"{'directory' if is_dir else 'file'}")
    splits[split] = SplitFiles(**{w: os.path.abspath(v) for w, v in values.items()})
  if not splits:
    raise ValueError("config.data.custom has no split: set train_images/train_annotations "
                     "and/or val_images/val_annotations (see configs/custom.py)")
  classes = _key(custom_cfg, "classes")
  if fmt == "semantic_png" and classes is None:
    raise ValueError("config.data.custom.classes is not set; format 'semantic_png' needs a text "
                     "file with one class name a line (line i names PNG value i)")
  if fmt != "semantic_png" and classes is not None:
    raise ValueError(f"config.data.custom.classes is for format 'semantic_png' only; format "
                     f"{fmt!r} reads its categories from the JSON")
  return splits


_JSON_CATEGORIES: dict = {}   # (path, size, mtime) -> Categories: each JSON is parsed once


def json_categories(path: str, fmt: str) -> Categories:
  """The `categories` of a COCO panoptic / instance JSON, in sorted id order."""
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, fmt)
  if key not in _JSON_CATEGORIES:
    try:
      with open(path) as f:
        categories = json.load(f).get("categories")
    except json.JSONDecodeError as e:
      raise ValueError(f"Annotation file {path} is not valid JSON: {e}") from e
    if not categories:
      raise ValueError(f"{path}: no 'categories' list; a COCO JSON lists its classes there")
    rows = []
    for c in categories:
      if not isinstance(c.get("id"), int) or "name" not in c:
        raise ValueError(f"{path}: category {c} needs an integer 'id' and a 'name'")
      if fmt == "coco_panoptic" and c.get("isthing") not in (0, 1, True, False):
        raise ValueError(f"{path}: category {c['id']} ({c['name']}) needs 'isthing' 0 or 1")
      rows.append((c["id"], str(c["name"]), bool(c.get("isthing", True))))
    rows.sort()
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
      raise ValueError(f"{path}: category ids {sorted({i for i in ids if ids.count(i) > 1})} "
                       "appear more than once")
    _JSON_CATEGORIES[key] = Categories(ids=tuple(ids), names=tuple(r[1] for r in rows),
                                       is_thing=tuple(r[2] for r in rows), source=path)
  return _JSON_CATEGORIES[key]


def classes_file_categories(path: str) -> Categories:
  """One class name a line (line i names PNG value i); blank lines only at the end."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"config.data.custom.classes={path!r} does not exist") from None
  while lines and not lines[-1].strip():
    lines.pop()
  names = [line.strip() for line in lines]
  if not names:
    raise ValueError(f"{path}: no class names (expected one a line)")
  if "" in names:
    raise ValueError(f"{path}: line {names.index('') + 1} is blank; every line names the class "
                     "of its PNG value (line 1 = value 0)")
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: class names {sorted({n for n in names if names.count(n) > 1})} "
                     "appear more than once")
  return Categories(ids=tuple(range(len(names))), names=tuple(names),
                    is_thing=(False,) * len(names), source=path)


def read_categories(custom_cfg) -> Categories:
  """The data set's categories: from the classes file (semantic_png) or the JSON of the
  validation split (of the train split when there is no validation split)."""
  splits = split_files(custom_cfg)
  fmt = check_format(custom_cfg)
  if fmt == "semantic_png":
    categories = classes_file_categories(_key(custom_cfg, "classes"))
  else:
    files = splits.get("validation") or splits["train"]
    categories = json_categories(files.annotations, fmt)
  if FORMATS[fmt] != "instance" and len(categories.ids) > MAX_SEMANTIC_CLASSES:
    raise ValueError(f"{categories.source}: {len(categories.ids)} categories; at most "
                     f"{MAX_SEMANTIC_CLASSES} are supported (semantic labels are 8-bit, 255 = ignore)")
  return categories


def dataset_info(data_cfg) -> info_lib.DatasetInfo:
  """DatasetInfo of the custom data set: the data's names, thing flags and own category ids."""
  categories = read_categories(data_cfg.custom)
  return info_lib.DatasetInfo(
      name="custom", kind=FORMATS[check_format(data_cfg.custom)],
      num_classes=len(categories.ids), class_names=categories.names,
      is_thing=np.asarray(categories.is_thing, np.bool_), category_ids=categories.ids)


def resolve_num_classes(cfg) -> None:
  """Sets cfg.model.num_classes from a custom data set when it is None (configs/custom.py);
  raises when it is set to another count. Other data sets are left alone."""
  if cfg.data.name != "custom":
    return
  categories = read_categories(cfg.data.custom)
  k = len(categories.ids)
  if cfg.model.num_classes is None:
    cfg.model.num_classes = k
  elif cfg.model.num_classes != k:
    raise ValueError(f"config.model.num_classes={cfg.model.num_classes} contradicts the data: "
                     f"{categories.source} has {k} categories; drop the override (configs/custom.py "
                     "leaves it unset so that it follows the data)")


def _hash_file(digest, path: str) -> None:
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)


def _hash_listing(digest, directory: str) -> None:
  """Every file under `directory` by relative name, size and modification time."""
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      stat = os.stat(os.path.join(root, name))
      rel = os.path.relpath(os.path.join(root, name), directory)
      digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def fingerprint(custom_cfg) -> str:
  """16 hex digits that change when any file of the data set changes: the annotation JSON and
  classes file by content, the image / PNG directories by names, sizes and times."""
  fmt = check_format(custom_cfg)
  digest = hashlib.sha256(fmt.encode())
  for split, files in sorted(split_files(custom_cfg).items()):
    for field in dataclasses.fields(files):
      path = getattr(files, field.name)
      if path is None:
        continue
      digest.update(f"\n{split}.{field.name}={path}\n".encode())
      (_hash_listing if os.path.isdir(path) else _hash_file)(digest, path)
  if fmt == "semantic_png":
    _hash_file(digest, _key(custom_cfg, "classes"))
  return digest.hexdigest()[:16]
