"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic API's rules (panopticapi `pq_compute`).

Per image: segments match when IoU > 0.5 (same class, ground truth not crowd); the union leaves out
the prediction's pixels on void (id 0); unmatched crowd segments are ignored, and an unmatched
prediction is not a false positive when more than half of it lies on void or on a crowd region of
its class. Predicted areas come from the map, ground-truth areas from the segment list (as the API).
"""
import collections
import math
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

VOID = 0
_OFFSET = 2 ** 32


def _by_segment_id(segments: Sequence[Mapping], side: str, image_id) -> dict:
  """{segment id: segment}; a ValueError names an id listed twice (panopticapi keeps the last)."""
  out = {}
  for segment in segments:
    key = int(segment["id"])
    if key in out:
      raise ValueError(f"image {image_id}: segment id {key} is listed twice in the {side}'s "
                       "segments_info; each segment needs its own id")
    out[key] = segment
  return out


class PQStat:
  """Per-category counts over images (TP, FP, FN) and the IoU of every match.

  The IoUs are kept one by one and summed with `math.fsum` (the correctly rounded sum), so the
  result does not depend on the order in which images or partial stats were added.
  """

  def __init__(self):
    self.ious: Dict[int, list] = collections.defaultdict(list)
    self.tp: Dict[int, int] = collections.defaultdict(int)
    self.fp: Dict[int, int] = collections.defaultdict(int)
    self.fn: Dict[int, int] = collections.defaultdict(int)

  @property
  def iou(self) -> Dict[int, float]:
    """Per-category sum of the matched IoUs."""
    return {k: math.fsum(v) for k, v in self.ious.items()}

  def __iadd__(self, other: "PQStat") -> "PQStat":
    for mine, theirs in ((self.ious, other.ious), (self.tp, other.tp), (self.fp, other.fp),
                         (self.fn, other.fn)):
      for k, v in theirs.items():
        mine[k] += v
    return self

  def add_image(self, gt_map: np.ndarray, gt_segments: Sequence[Mapping], pred_map: np.ndarray,
                pred_segments: Sequence[Mapping], categories: Optional[Iterable[int]] = None,
                image_id=None) -> None:
    """Adds one image: id maps [H, W] (0 = void) and their segment lists ({'id', 'category_id', ...})."""
    if gt_map.shape != pred_map.shape:
      raise ValueError(f"image {image_id}: prediction {pred_map.shape} and ground truth {gt_map.shape} "
                       "differ in size")
    gt_segs = _by_segment_id(gt_segments, "ground truth", image_id)
    pred_segs = _by_segment_id(pred_segments, "prediction", image_id)
    gt_area = {i: int(s["area"]) if "area" in s else None for i, s in gt_segs.items()}
    if any(a is None for a in gt_area.values()):
      ids, counts = np.unique(gt_map, return_counts=True)
      counted = dict(zip(ids.tolist(), counts.tolist()))
      gt_area = {i: counted.get(i, 0) if a is None else a for i, a in gt_area.items()}

    pred_area = {}
    ids, counts = np.unique(pred_map, return_counts=True)
    for label, count in zip(ids.tolist(), counts.tolist()):
      if label not in pred_segs:
        if label == VOID:
          continue
        raise KeyError(f"image {image_id}: segment id {label} is in the prediction map but not in its "
                       "segment list")
      if categories is not None and pred_segs[label]["category_id"] not in categories:
        raise KeyError(f"image {image_id}: segment {label} has unknown category "
                       f"{pred_segs[label]['category_id']}")
      pred_area[label] = count
    missing = sorted(set(pred_segs) - set(pred_area))
    if missing:
      raise KeyError(f"image {image_id}: segments {missing} are listed but absent from the prediction map")

    joint = gt_map.astype(np.uint64) * _OFFSET + pred_map.astype(np.uint64)
    ids, counts = np.unique(joint, return_counts=True)
    overlap = {(int(j // _OFFSET), int(j % _OFFSET)): int(c) for j, c in zip(ids, counts)}

    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), inter in overlap.items():
      if gt_id not in gt_segs or pred_id not in pred_segs:
        continue
      gt, pred = gt_segs[gt_id], pred_segs[pred_id]
      if gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
        continue
      union = pred_area[pred_id] + gt_area[gt_id] - inter - overlap.get((VOID, pred_id), 0)
      iou = inter / union
      if iou > 0.5:
        self.tp[gt["category_id"]] += 1
        self.ious[gt["category_id"]].append(iou)
        gt_matched.add(gt_id)
        pred_matched.add(pred_id)

    crowd_of_class = {}
    for gt_id, gt in gt_segs.items():
      if gt_id in gt_matched:
        continue
      if gt.get("iscrowd", 0) == 1:
        crowd_of_class[gt["category_id"]] = gt_id
        continue
      self.fn[gt["category_id"]] += 1

    for pred_id, pred in pred_segs.items():
      if pred_id in pred_matched:
        continue
      ignored = overlap.get((VOID, pred_id), 0)
      if pred["category_id"] in crowd_of_class:
        ignored += overlap.get((crowd_of_class[pred["category_id"]], pred_id), 0)
      if ignored / pred_area[pred_id] > 0.5:
        continue
      self.fp[pred["category_id"]] += 1

  def average(self, categories: Mapping[int, bool], isthing: Optional[bool] = None):
    """Means over categories ({id: isthing}) seen at least once -> ({pq, sq, rq, n}, per class).

    Fractions in [0, 1]; `isthing` None = all, True = things, False = stuff.
    """
    totals = dict(pq=0.0, sq=0.0, rq=0.0)
    iou_sums = self.iou
    count = 0
    per_class = {}
    for cat, cat_isthing in categories.items():
      if isthing is not None and bool(cat_isthing) != isthing:
        continue
      tp, fp, fn = self.tp.get(cat, 0), self.fp.get(cat, 0), self.fn.get(cat, 0)
      iou = iou_sums.get(cat, 0.0)
      if tp + fp + fn == 0:
        per_class[cat] = dict(pq=0.0, sq=0.0, rq=0.0)
        continue
      count += 1
      denominator = tp + 0.5 * fp + 0.5 * fn
      result = dict(pq=iou / denominator, sq=iou / tp if tp else 0.0, rq=tp / denominator)
      per_class[cat] = result
      for k in totals:
        totals[k] += result[k]
    summary = {k: (v / count if count else 0.0) for k, v in totals.items()}
    summary["n"] = count
    return summary, per_class

  def state_dict(self) -> dict:
    """The stats as JSON-able lists (category ids as keys of `from_state_dict`)."""
    return {name: [[k, v] for k, v in sorted(getattr(self, name).items())]
            for name in ("ious", "tp", "fp", "fn")}

  @classmethod
  def from_state_dict(cls, state: Mapping) -> "PQStat":
    stat = cls()
    for name in ("ious", "tp", "fp", "fn"):
      getattr(stat, name).update({int(k): v for k, v in state[name]})
    return stat

  def summary(self, categories: Mapping[int, bool]) -> dict:
    """{'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class': {id: {pq, sq, rq}}}, fractions."""
    out = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
      out[name], per_class = self.average(categories, isthing)
      if isthing is None:
        out["per_class"] = per_class
    return out


def format_table(summary: Mapping) -> str:
  """The panopticapi-style printed table (values x 100)."""
  lines = [f"{'':10s}|{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}{'N':>6s}", "-" * 41]
  for name in ("All", "Things", "Stuff"):
    r = summary[name]
    lines.append(f"{name:10s}|{100 * r['pq']:8.3f}{100 * r['sq']:8.3f}{100 * r['rq']:8.3f}{r['n']:6d}")
  return "\n".join(lines)
