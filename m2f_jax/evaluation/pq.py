"""Command line PQ on COCO panoptic files (PNG id = R + 256 G + 256^2 B), panopticapi's rules:

  python -m m2f_jax.evaluation.pq --gt-json F --gt-dir D --pred-json F --pred-dir D [--out F]

Prints the PQ/SQ/RQ table (x 100) and writes the results (fractions, per class too) as JSON.
"""
import argparse
import json
import os
import sys
from typing import Optional, Sequence

from m2f_jax.evaluation import panoptic_format
from m2f_jax.evaluation.panoptic_quality import PQStat, format_table


def _by_image(data: dict, path: str) -> dict:
  """{image_id: annotation}; a ValueError names an image annotated twice (panopticapi keeps one)."""
  out = {}
  for ann in data.get("annotations", []):
    image_id = ann["image_id"]
    if image_id in out:
      raise ValueError(f"{path} has two annotations for image_id {image_id!r}; keep one per image")
    out[image_id] = ann
  return out


def _missing_prediction(image_id, pred: dict, pred_json: str, gt_json: str) -> Exception:
  """The error for a ground-truth image without prediction: string ids against integer ids (which
  never match) are named as such."""
  other_type = [i for i in pred if isinstance(i, str) != isinstance(image_id, str)]
  if other_type:
    strings, integers = (gt_json, pred_json) if isinstance(image_id, str) else (pred_json, gt_json)
    example = image_id if isinstance(image_id, str) else sorted(other_type)[0]
    return ValueError(f"{strings} has string image ids (e.g. {example!r}) but {integers} has "
                      "integer ids: write integer ids (m2f_jax.tools.predict does for all-digit "
                      "file names such as 000000142238.jpg)")
  return KeyError(f"no prediction for image {image_id} in {pred_json}")


def evaluate_files(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str) -> dict:
  """PQ of COCO-format panoptic predictions against COCO-format ground truth (fractions)."""
  gt = panoptic_format.read_json(gt_json)
  pred = panoptic_format.read_json(pred_json)
  if "categories" not in gt:
    raise ValueError(f"{gt_json} has no 'categories' list")
  categories = {int(c["id"]): bool(c.get("isthing", 0)) for c in gt["categories"]}
  gt_by_image = _by_image(gt, gt_json)
  pred_by_image = _by_image(pred, pred_json)
  stat = PQStat()
  for image_id, gt_ann in gt_by_image.items():
    if image_id not in pred_by_image:
      raise _missing_prediction(image_id, pred_by_image, pred_json, gt_json)
    pred_ann = pred_by_image[image_id]
    gt_map = panoptic_format.read_id_png(os.path.join(gt_dir, gt_ann["file_name"]))
    pred_map = panoptic_format.read_id_png(os.path.join(pred_dir, pred_ann["file_name"]))
    stat.add_image(gt_map, gt_ann["segments_info"], pred_map, pred_ann["segments_info"], categories,
                   image_id)
  return stat.summary(categories)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description="COCO panoptic quality (panopticapi rules).")
  parser.add_argument("--gt-json", required=True)
  parser.add_argument("--gt-dir", required=True)
  parser.add_argument("--pred-json", required=True)
  parser.add_argument("--pred-dir", required=True)
  parser.add_argument("--out", default=None, help="JSON file for the results (default: beside --pred-json)")
  args = parser.parse_args(argv)
  try:
    summary = evaluate_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
  except (OSError, KeyError, ValueError) as e:
    sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) else e}")
  print(format_table(summary))
  out = args.out or os.path.splitext(args.pred_json)[0] + "_pq.json"
  with open(out, "w") as f:
    json.dump({k: ({str(c): v for c, v in r.items()} if k == "per_class" else r)
               for k, r in summary.items()}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
