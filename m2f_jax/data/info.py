"""Per data set metadata: class names, thing flags and which ground truths a data set has."""
import dataclasses

import numpy as np

from m2f_jax.data import categories

# Kind of annotation each data set name carries: 'panoptic', 'instance' or 'semantic'.
DATASET_KINDS = {
    "synthetic": "panoptic",
    "coco_panoptic": "panoptic",
    "coco_instance": "instance",
    "ade20k_semantic": "semantic",
    "ade20k_panoptic": "panoptic",
    "cityscapes_semantic": "semantic",
    "cityscapes_instance": "instance",
    "cityscapes_panoptic": "panoptic",
}

SYNTHETIC_THINGS = ("disc", "square", "triangle", "ring", "cross")
SYNTHETIC_STUFF = ("sky", "grass", "brick")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Classes of a data set in contiguous order 0..K-1.

  Attributes:
    name: data set name (cfg.data.name).
    kind: 'panoptic', 'instance' or 'semantic' (which ground truths the data set has).
    num_classes: K.
    class_names: K names.
    is_thing: np.bool_ [K], True for countable classes.
    category_ids: K ints, the data set's own id of each contiguous class (what its annotation
      files use, and what exported predictions must use): COCO's category ids, ADE20K semantic's
      PNG values (k + 1), ADE20K panoptic's JSON ids (k, as the authors' prepare script writes),
      Cityscapes' label ids. The synthetic set, which has no files of its own ids, uses k + 1
      (0 stays the COCO panoptic 'unlabeled' id).
  """
  name: str
  kind: str
  num_classes: int
  class_names: tuple[str, ...]
  is_thing: np.ndarray
  category_ids: tuple[int, ...]


def _make(name: str, names, things, category_ids) -> DatasetInfo:
  return DatasetInfo(name=name, kind=DATASET_KINDS[name], num_classes=len(names),
                     class_names=tuple(names), is_thing=np.asarray(things, dtype=np.bool_),
                     category_ids=tuple(int(i) for i in category_ids))


def dataset_kind(name: str) -> str:
  """'panoptic', 'instance' or 'semantic' for a data set name; raises on an unknown name."""
  if name not in DATASET_KINDS:
    raise ValueError(f"Unknown data set name cfg.data.name={name!r}; expected one of "
                     f"{sorted(DATASET_KINDS)}")
  return DATASET_KINDS[name]


def dataset_info_by_name(name: str) -> DatasetInfo:
  """DatasetInfo of a data set name."""
  dataset_kind(name)
  if name == "synthetic":
    names = SYNTHETIC_THINGS + SYNTHETIC_STUFF
    return _make(name, names, [True] * len(SYNTHETIC_THINGS) + [False] * len(SYNTHETIC_STUFF),
                 range(1, len(names) + 1))
  if name == "coco_panoptic":
    return _make(name, [c[1] for c in categories.COCO_PANOPTIC],
                 [bool(c[2]) for c in categories.COCO_PANOPTIC],
                 [c[0] for c in categories.COCO_PANOPTIC])
  if name == "coco_instance":
    return _make(name, [c[1] for c in categories.COCO_INSTANCE], [True] * 80,
                 [c[0] for c in categories.COCO_INSTANCE])
  if name.startswith("ade20k"):
    k = len(categories.ADE20K_NAMES)
    things = [i in categories.ADE20K_THING_IDS for i in range(k)]
    first = 1 if name == "ade20k_semantic" else 0
    return _make(name, categories.ADE20K_NAMES, things, range(first, k + first))
  labels = categories.CITYSCAPES_LABELS
  if name == "cityscapes_instance":
    things = [l for l in labels if l[3]]
    return _make(name, [l[1] for l in things], [True] * len(things), [l[0] for l in things])
  return _make(name, [l[1] for l in labels], [bool(l[3]) for l in labels], [l[0] for l in labels])


def get_dataset_info(data_cfg) -> DatasetInfo:
  """DatasetInfo for `data_cfg.name` (see DATASET_KINDS for the names; 'custom' reads the data)."""
  if data_cfg.name == "custom":
    from m2f_jax.data import custom_files  # pylint: disable=g-import-not-at-top  (imports this module)
    return custom_files.dataset_info(data_cfg)
  return dataset_info_by_name(data_cfg.name)
