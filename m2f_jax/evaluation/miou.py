"""Semantic segmentation metrics from a confusion matrix (detectron2 SemSegEvaluator's definitions)."""
from typing import Optional, Sequence

import numpy as np


class ConfusionMatrix:
  """[K+1, K+1] counts indexed [prediction, ground truth]; ignored pixels go to row/column K."""

  def __init__(self, num_classes: int, ignore_label: int = 255):
    self.num_classes = int(num_classes)
    self.ignore_label = int(ignore_label)
    self.matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)

  def add(self, prediction: np.ndarray, ground_truth: np.ndarray) -> None:
    """prediction int [H, W] in 0..K-1; ground_truth int [H, W] (ignore_label = ignored)."""
    if prediction.shape != ground_truth.shape:
      raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in size")
    k = self.num_classes
    gt = ground_truth.astype(np.int64).reshape(-1)
    pred = prediction.astype(np.int64).reshape(-1)
    bad = (gt != self.ignore_label) & ((gt < 0) | (gt >= k))
    if bad.any():
      raise ValueError(f"ground-truth class {int(gt[bad][0])} outside 0..{k - 1} "
                       f"(and not the ignore label {self.ignore_label})")
    gt = np.where(gt == self.ignore_label, k, gt)
    self.matrix += np.bincount((k + 1) * pred + gt, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

  def state_dict(self) -> dict:
    return {"matrix": self.matrix.tolist()}

  def load_state_dicts(self, states) -> None:
    """Replaces the counts with the sum of `states` (e.g. one per process)."""
    self.matrix = np.sum([np.asarray(s["matrix"], np.int64) for s in states], axis=0)

  def summary(self, class_names: Optional[Sequence[str]] = None) -> dict:
    """mIoU, fwIoU, mACC, pACC (percent) and per-class IoU over classes present in the ground truth."""
    counts = self.matrix[:-1, :-1].astype(np.float64)
    tp = np.diag(counts)
    gt_total = counts.sum(0)
    pred_total = counts.sum(1)
    present = gt_total > 0
    union = gt_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
      acc = np.where(present, tp / gt_total, np.nan)
      iou = np.where(present & (union > 0), tp / union, np.nan)
    valid_iou = ~np.isnan(iou)
    weights = gt_total / max(gt_total.sum(), 1.0)
    names = class_names if class_names is not None else [str(k) for k in range(self.num_classes)]
    return dict(
        mIoU=float(100 * np.nanmean(iou)) if valid_iou.any() else 0.0,
        fwIoU=float(100 * np.sum(iou[valid_iou] * weights[valid_iou])),
        mACC=float(100 * np.nanmean(acc)) if present.any() else 0.0,
        pACC=float(100 * tp.sum() / max(gt_total.sum(), 1.0)),
        per_class={str(n): float(100 * v) for n, v in zip(names, iou)},
    )
