"""Per-image evaluation ground truth at original resolution, from a decoded example (numpy)."""
import numpy as np
from pycocotools import mask as mask_util

from m2f_jax.data import info as info_lib


def ground_truth(example: dict, dataset_info: info_lib.DatasetInfo) -> dict:
  """Builds the eval ground-truth dict of the batch contract.

  Args:
    example: decoded example: 'image_id', 'layers' [S0, H0, W0(, 1)] index maps, 'segments'
      (arrays 'id', 'category_id', 'iscrowd', 'layer', 'area', 'bbox').
    dataset_info: the data set's classes; its `kind` decides which ground truths exist.

  Returns:
    {'image_id', 'panoptic' int32 [H0, W0] + 'segments' (panoptic data sets), 'semantic'
    uint8 [H0, W0] with 255 = ignore (panoptic and semantic data sets), 'instances' with COCO
    RLE masks (panoptic and instance data sets; thing classes only)}.
  """
  layers = np.asarray(example["layers"]).astype(np.int64)
  if layers.ndim == 4:
    layers = layers[..., 0]
  seg = example["segments"]
  ids = np.asarray(seg["id"], np.int64)
  cats = np.asarray(seg["category_id"], np.int64)
  crowd = np.asarray(seg["iscrowd"], np.int64)
  layer_of = np.asarray(seg["layer"], np.int64)
  area = np.asarray(seg["area"], np.float64)
  bbox = np.asarray(seg["bbox"], np.float64).reshape(-1, 4)
  kind = dataset_info.kind
  gt = {"image_id": int(example["image_id"])}
  if kind == "panoptic":
    gt["panoptic"] = np.concatenate([[0], ids])[layers[0]].astype(np.int32)
    gt["segments"] = [
        {"id": int(ids[i]), "category_id": int(cats[i]), "iscrowd": int(crowd[i]),
         "isthing": bool(dataset_info.is_thing[cats[i]]), "area": float(area[i])}
        for i in range(len(ids))]
  if kind in ("panoptic", "semantic"):
    gt["semantic"] = np.concatenate([[255], cats])[layers[0]].astype(np.uint8)
  if kind in ("panoptic", "instance"):
    instances = []
    for i in range(len(ids)):
      if not dataset_info.is_thing[cats[i]]:
        continue
      mask = np.asfortranarray((layers[layer_of[i]] == i + 1).astype(np.uint8))
      instances.append({"category_id": int(cats[i]), "iscrowd": int(crowd[i]),
                        "segmentation": mask_util.encode(mask), "bbox": bbox[i].tolist(),
                        "area": float(area[i])})
    gt["instances"] = instances
  return gt
