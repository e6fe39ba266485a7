"""Instance segmentation mask AP with pycocotools' COCOeval on RLE masks (iouType 'segm')."""
import contextlib
import io
from typing import Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: np.ndarray) -> list:
  """bool [N, H, W] -> N COCO RLE dicts (str counts)."""
  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(np.asarray(masks, np.uint8), 0, -1)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles


def _as_rle(segmentation: Mapping, height: int, width: int) -> dict:
  rle = dict(segmentation)
  if isinstance(rle.get("counts"), list):   # uncompressed RLE (crowd regions in COCO json)
    rle = mask_utils.frPyObjects(rle, height, width)
  if isinstance(rle["counts"], bytes):
    rle["counts"] = rle["counts"].decode("ascii")
  return rle


class InstanceAP:
  """Accumulates ground truth and predictions per image; `summary()` runs COCOeval once.

  Class ids are contiguous 0..K-1 here; COCOeval sees k + 1 (ids must not collide with its 0 marker).
  The images are sorted by id before COCOeval, so the result does not depend on the order in which
  images (or the states of other processes) were added.
  """

  def __init__(self, num_classes: int, max_detections: int = 100):
    self.num_classes = int(num_classes)
    self.max_detections = int(max_detections)
    self._images, self._gt, self._dt = [], [], []

  def add_image(self, image_id: int, height: int, width: int, gt_instances: Sequence[Mapping],
                scores: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> None:
    """gt_instances: [{'category_id', 'iscrowd', 'segmentation' (RLE), 'bbox', 'area'}];
    predictions: scores [N], labels [N] (0..K-1), masks bool [N, H, W]."""
    image_id = int(image_id)
    if masks.shape[1:] != (height, width):
      raise ValueError(f"image {image_id}: predicted masks {masks.shape[1:]} differ from the image size "
                       f"{(height, width)}")
    self._images.append(dict(id=image_id, height=int(height), width=int(width)))
    for inst in gt_instances:
      rle = _as_rle(inst["segmentation"], height, width)
      self._gt.append(dict(
          image_id=image_id, category_id=int(inst["category_id"]) + 1,
          iscrowd=int(inst.get("iscrowd", 0)), segmentation=rle,
          area=float(inst["area"]) if "area" in inst else float(mask_utils.area(rle)),
          bbox=[float(v) for v in inst["bbox"]] if "bbox" in inst else list(mask_utils.toBbox(rle))))
    for score, label, rle in zip(np.asarray(scores), np.asarray(labels), encode_masks(masks)):
      self._dt.append(dict(image_id=image_id, category_id=int(label) + 1, segmentation=rle,
                           score=float(score)))

  def state_dict(self) -> dict:
    """Images, ground truth and detections as JSON-able lists."""
    return {"images": self._images, "gt": self._gt, "dt": self._dt}

  def load_state_dicts(self, states: Sequence[Mapping]) -> None:
    """Replaces the contents with the union of `states` (e.g. one per process)."""
    self._images = [image for state in states for image in state["images"]]
    self._gt = [ann for state in states for ann in state["gt"]]
    self._dt = [det for state in states for det in state["dt"]]
    ids = [image["id"] for image in self._images]
    if len(set(ids)) != len(ids):
      raise ValueError("an image id occurs more than once among the merged instance AP states")

  def summary(self, class_names: Optional[Sequence[str]] = None) -> dict:
    """{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'per_class': {name: AP}} in percent."""
    if not self._images:
      raise ValueError("no images were added to the instance AP evaluator")
    by_image = lambda entry: entry["image_id"]  # stable sorts: per-image order is kept
    images = sorted(self._images, key=lambda image: image["id"])
    annotations = [dict(ann, id=i + 1) for i, ann in enumerate(sorted(self._gt, key=by_image))]
    gt = COCO()
    gt.dataset = dict(images=images, annotations=annotations,
                      categories=[dict(id=k + 1, name=str(k)) for k in range(self.num_classes)])
    with contextlib.redirect_stdout(io.StringIO()):
      gt.createIndex()
    if not self._dt:
      return {**{k: 0.0 for k in STAT_NAMES}, "per_class": {}}
    with contextlib.redirect_stdout(io.StringIO()):
      dt = gt.loadRes(sorted(self._dt, key=by_image))
      coco_eval = COCOeval(gt, dt, "segm")
      coco_eval.params.maxDets = [1, 10, self.max_detections]
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    # COCOeval marks "no ground truth in this range" with -1: reported as NaN (as detectron2).
    out = {name: float(100 * v) if v >= 0 else float("nan")
           for name, v in zip(STAT_NAMES, coco_eval.stats[:6])}
    # precision [T, R, K, A, M]: all IoUs, all recalls, area 'all', the largest detection count.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for index, cat in enumerate(coco_eval.params.catIds):
      p = precision[:, :, index]
      p = p[p > -1]
      name = class_names[cat - 1] if class_names is not None else str(cat - 1)
      per_class[name] = float(100 * p.mean()) if p.size else float("nan")
    out["per_class"] = per_class
    return out
