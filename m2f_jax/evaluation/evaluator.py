"""Accumulates per-image results of every task and summarises them (percent, detectron2 style)."""
from typing import Mapping, Sequence

import numpy as np

from m2f_jax.evaluation.instance_ap import InstanceAP
from m2f_jax.evaluation.miou import ConfusionMatrix
from m2f_jax.evaluation.panoptic_quality import PQStat

# The ground-truth keys each task needs (a data set without them does not support the task).
REQUIRED_KEYS = {"panoptic": ("panoptic", "segments"), "instance": ("instances",),
                 "semantic": ("semantic",)}
# The tasks each kind of data set (m2f_jax.data.info.DATASET_KINDS) has ground truth for.
KIND_TASKS = {"panoptic": ("panoptic", "instance", "semantic"), "instance": ("instance",),
              "semantic": ("semantic",)}


def supported_tasks(tasks: Sequence[str], ground_truth: Mapping) -> tuple:
  """The tasks of `tasks` whose ground truth is present in a per-image ground-truth dict."""
  unknown = sorted(set(tasks) - set(REQUIRED_KEYS))
  if unknown:
    raise ValueError(f"unknown evaluation tasks {unknown}; choose from {sorted(REQUIRED_KEYS)}")
  return tuple(t for t in tasks if all(k in ground_truth for k in REQUIRED_KEYS[t]))


def tasks_of_kind(tasks: Sequence[str], kind: str) -> tuple:
  """The tasks of `tasks` that a data set of `kind` ('panoptic', 'instance', 'semantic') supports."""
  unknown = sorted(set(tasks) - set(REQUIRED_KEYS))
  if unknown:
    raise ValueError(f"unknown evaluation tasks {unknown}; choose from {sorted(REQUIRED_KEYS)}")
  return tuple(t for t in tasks if t in KIND_TASKS[kind])


class Evaluator:
  """`add(ground_truth, prediction)` per image, then `summary()`.

  prediction (PostProcessor output at the original size): 'panoptic': (segment_map, segments),
  'instance': {scores, labels, masks}, 'semantic': int class map [H0, W0].
  """

  def __init__(self, tasks: Sequence[str], num_classes: int, is_thing: Sequence[bool],
               class_names: Sequence[str], ignore_label: int = 255, max_detections: int = 100):
    self.tasks = tuple(tasks)
    self.class_names = tuple(class_names)
    self.categories = {k: bool(t) for k, t in enumerate(is_thing)}
    if not len(self.categories) == len(self.class_names) == num_classes:
      raise ValueError(f"num_classes {num_classes}, is_thing ({len(self.categories)}) and class_names "
                       f"({len(self.class_names)}) disagree")
    self.pq = PQStat() if "panoptic" in tasks else None
    self.ap = InstanceAP(num_classes, max_detections) if "instance" in tasks else None
    self.confusion = ConfusionMatrix(num_classes, ignore_label) if "semantic" in tasks else None
    self.num_images = 0

  def add(self, ground_truth: Mapping, prediction: Mapping) -> None:
    image_id = ground_truth.get("image_id")
    missing = [t for t in self.tasks if t not in prediction]
    if missing:
      raise KeyError(f"image {image_id}: prediction lacks tasks {missing}")
    if self.pq is not None:
      segment_map, segments = prediction["panoptic"]
      self.pq.add_image(np.asarray(ground_truth["panoptic"]), ground_truth["segments"], segment_map,
                        segments, self.categories, image_id)
    if self.ap is not None:
      inst = prediction["instance"]
      height, width = inst["masks"].shape[1:]
      self.ap.add_image(image_id, height, width, ground_truth["instances"], inst["scores"],
                        inst["labels"], inst["masks"])
    if self.confusion is not None:
      self.confusion.add(np.asarray(prediction["semantic"]), np.asarray(ground_truth["semantic"]))
    self.num_images += 1

  def state_dict(self) -> dict:
    """Everything accumulated so far, as JSON-able values (see m2f_jax.evaluation.merge)."""
    state = {"num_images": self.num_images}
    for name, part in (("pq", self.pq), ("ap", self.ap), ("confusion", self.confusion)):
      if part is not None:
        state[name] = part.state_dict()
    return state

  def load_state_dicts(self, states: Sequence[Mapping]) -> None:
    """Replaces the contents with the union of `states` (one per process, same tasks)."""
    self.num_images = sum(int(s["num_images"]) for s in states)
    if self.pq is not None:
      self.pq = PQStat()
      for state in states:
        self.pq += PQStat.from_state_dict(state["pq"])
    if self.ap is not None:
      self.ap.load_state_dicts([s["ap"] for s in states])
    if self.confusion is not None:
      self.confusion.load_state_dicts([s["confusion"] for s in states])

  def summary(self) -> dict:
    """{'panoptic': {PQ, SQ, RQ, PQ_th, SQ_th, RQ_th, PQ_st, SQ_st, RQ_st, per_class}, 'instance': {AP...},
    'semantic': {mIoU, fwIoU, mACC, pACC, per_class}, 'num_images'}; values in percent."""
    out = {"num_images": self.num_images}
    if self.pq is not None:
      pq = self.pq.summary(self.categories)
      panoptic = {}
      for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
          panoptic[metric.upper() + suffix] = 100 * pq[group][metric]
      panoptic["per_class"] = {self.class_names[k]: {m.upper(): 100 * v for m, v in r.items()}
                               for k, r in pq["per_class"].items()}
      out["panoptic"] = panoptic
    if self.ap is not None:
      out["instance"] = self.ap.summary(self.class_names)
    if self.confusion is not None:
      out["semantic"] = self.confusion.summary(self.class_names)
    return out


def headline(summary: Mapping) -> dict:
  """The scalar metrics of a summary, flattened as 'task/name' (for logs and TensorBoard)."""
  flat = {}
  for task in ("panoptic", "instance", "semantic"):
    for name, value in summary.get(task, {}).items():
      if name != "per_class":
        flat[f"{task}/{name}"] = float(value)
  return flat
