"""Metrics against independent references: panopticapi's pq_compute rules, pycocotools, a plain mIoU."""
import collections
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f_jax import evaluation
from m2f_jax.evaluation import panoptic_format, pq

NUM_CLASSES = 5
IS_THING = {0: True, 1: True, 2: True, 3: False, 4: False}


# ------------------------------------------------------------------ random panoptic pairs
def random_panoptic_pair(rng, hw=(24, 24)):
  """A ground truth with void and crowd segments and a perturbed prediction of it."""
  coarse = rng.integers(0, 9, (hw[0] // 4, hw[1] // 4))
  gt_map = np.kron(coarse, np.ones((4, 4), np.int64)).astype(np.int32)    # ids 0..8, 0 = void
  gt_segments = []
  for seg_id in np.unique(gt_map):
    if seg_id == 0:
      continue
    cat = int(rng.integers(0, NUM_CLASSES))
    crowd = int(IS_THING[cat] and rng.random() < 0.25)
    gt_segments.append(dict(id=int(seg_id), category_id=cat, iscrowd=crowd, isthing=IS_THING[cat],
                            area=int((gt_map == seg_id).sum())))
  pred_map = np.where(gt_map > 0, gt_map + 100, 0)
  noisy = rng.random(hw) < 0.15
  pred_map[noisy] = np.roll(pred_map, 3, axis=1)[noisy]                     # boundary-like noise
  pred_map[rng.random(hw) < 0.3 * (gt_map == 0)] = 100 + int(rng.integers(1, 9))   # spill on void
  top, left = rng.integers(0, hw[0] - 8, 2)
  pred_map[top:top + 8, left:left + 8] = 500                                 # an extra segment
  category_of = {s["id"] + 100: s["category_id"] for s in gt_segments}
  pred_segments = []
  for seg_id in np.unique(pred_map):
    if seg_id == 0:
      continue
    cat = category_of.get(int(seg_id), int(rng.integers(0, NUM_CLASSES)))
    if rng.random() < 0.15:
      cat = int(rng.integers(0, NUM_CLASSES))
    pred_segments.append(dict(id=int(seg_id), category_id=cat, isthing=IS_THING[cat]))
  return gt_map, gt_segments, pred_map.astype(np.int32), pred_segments


def reference_pq(pairs):
  """panopticapi pq_compute's rules, written plainly with pixel-pair counters."""
  tp, fp, fn, iou_sum = (collections.Counter() for _ in range(4))
  for gt_map, gt_segments, pred_map, pred_segments in pairs:
    gts = {s["id"]: s for s in gt_segments}
    preds = {s["id"]: s for s in pred_segments}
    pred_area = collections.Counter(pred_map.ravel().tolist())
    inter = collections.Counter(zip(gt_map.ravel().tolist(), pred_map.ravel().tolist()))
    matched_gt, matched_pred = set(), set()
    for g, s in gts.items():
      for p, t in preds.items():
        if s["iscrowd"] or s["category_id"] != t["category_id"] or inter[(g, p)] == 0:
          continue
        iou = inter[(g, p)] / (pred_area[p] + s["area"] - inter[(g, p)] - inter[(0, p)])
        if iou > 0.5:
          tp[s["category_id"]] += 1
          iou_sum[s["category_id"]] += iou
          matched_gt.add(g)
          matched_pred.add(p)
    crowd = {}
    for g, s in gts.items():
      if g not in matched_gt:
        if s["iscrowd"]:
          crowd[s["category_id"]] = g
        else:
          fn[s["category_id"]] += 1
    for p, t in preds.items():
      if p in matched_pred:
        continue
      ignored = inter[(0, p)] + (inter[(crowd[t["category_id"]], p)] if t["category_id"] in crowd else 0)
      if ignored / pred_area[p] <= 0.5:
        fp[t["category_id"]] += 1
  results = {}
  for name, want in (("All", None), ("Things", True), ("Stuff", False)):
    values = []
    for c, thing in IS_THING.items():
      if (want is None or thing == want) and tp[c] + fp[c] + fn[c] > 0:
        denominator = tp[c] + 0.5 * fp[c] + 0.5 * fn[c]
        values.append((iou_sum[c] / denominator, iou_sum[c] / tp[c] if tp[c] else 0.0, tp[c] / denominator))
    results[name] = dict(zip(("pq", "sq", "rq"), np.mean(values, axis=0).tolist()), n=len(values))
  return results, (tp, fp, fn)


@pytest.fixture(scope="module")
def panoptic_pairs():
  rng = np.random.default_rng(0)
  return [random_panoptic_pair(rng) for _ in range(12)]


def test_pq_equals_panopticapi_rules(panoptic_pairs):
  stat = evaluation.PQStat()
  for pair in panoptic_pairs:
    stat.add_image(*pair, categories=IS_THING)
  got = stat.summary(IS_THING)
  expected, (tp, fp, fn) = reference_pq(panoptic_pairs)
  # The random cases exercise matches, misses, false positives, crowd and void.
  assert sum(tp.values()) > 10 and sum(fp.values()) > 5 and sum(fn.values()) > 5
  assert any(s["iscrowd"] for pair in panoptic_pairs for s in pair[1])
  for group in ("All", "Things", "Stuff"):
    assert got[group]["n"] == expected[group]["n"]
    for metric in ("pq", "sq", "rq"):
      assert abs(got[group][metric] - expected[group][metric]) < 1e-9, (group, metric)
  assert 0.1 < got["All"]["pq"] < 0.9


def test_pq_accumulates_over_stats(panoptic_pairs):
  whole, first, second = evaluation.PQStat(), evaluation.PQStat(), evaluation.PQStat()
  for i, pair in enumerate(panoptic_pairs):
    whole.add_image(*pair)
    (first if i % 2 else second).add_image(*pair)
  first += second
  merged, expected = first.summary(IS_THING), whole.summary(IS_THING)
  for group in ("All", "Things", "Stuff"):
    assert merged[group]["n"] == expected[group]["n"]
    for metric in ("pq", "sq", "rq"):
      assert merged[group][metric] == pytest.approx(expected[group][metric], abs=1e-12)


def test_pq_stats_merge_exactly_in_any_order(panoptic_pairs):
  """Shards (as processes evaluate them) sent through JSON and merged in another order give the
  whole set's numbers bit for bit: IoUs are summed with math.fsum, counts are integers."""
  whole = evaluation.PQStat()
  shards = [evaluation.PQStat() for _ in range(3)]
  for i, pair in enumerate(panoptic_pairs):
    whole.add_image(*pair)
    shards[i % 3].add_image(*pair)
  merged = evaluation.PQStat()
  for shard in reversed(shards):
    merged += evaluation.PQStat.from_state_dict(json.loads(json.dumps(shard.state_dict())))
  assert merged.summary(IS_THING) == whole.summary(IS_THING)
  assert sum(whole.tp.values()) > 10


def test_pq_crowd_region_hides_false_positive():
  gt_map = np.zeros((4, 4), np.int32)
  gt_map[:, :2] = 1
  gt = [dict(id=1, category_id=0, iscrowd=1, area=8)]
  pred_map = np.zeros((4, 4), np.int32)
  pred_map[:, :3] = 7
  stat = evaluation.PQStat()
  stat.add_image(gt_map, gt, pred_map, [dict(id=7, category_id=0)])
  assert stat.fp[0] == 0 and stat.fn[0] == 0
  stat.add_image(gt_map, gt, pred_map, [dict(id=7, category_id=1)])   # another class: counts
  assert stat.fp[1] == 1


def test_pq_rejects_inconsistent_prediction():
  gt_map = np.ones((4, 4), np.int32)
  gt = [dict(id=1, category_id=0, iscrowd=0, area=16)]
  with pytest.raises(KeyError, match="not in its segment list"):
    evaluation.PQStat().add_image(gt_map, gt, np.full((4, 4), 3, np.int32), [])
  with pytest.raises(KeyError, match="absent from the prediction map"):
    evaluation.PQStat().add_image(gt_map, gt, np.zeros((4, 4), np.int32), [dict(id=2, category_id=0)])


def test_pq_command_line_on_coco_files(tmp_path, panoptic_pairs, capsys):
  categories = [dict(id=10 + k, name=f"c{k}", isthing=int(t)) for k, t in IS_THING.items()]
  for kind in ("gt", "pred"):
    os.makedirs(tmp_path / kind)
  gt_anns, pred_anns = [], []
  for image_id, (gt_map, gt_segs, pred_map, pred_segs) in enumerate(panoptic_pairs):
    name = f"{image_id:04d}.png"
    panoptic_format.write_id_png(str(tmp_path / "gt" / name), gt_map)
    panoptic_format.write_id_png(str(tmp_path / "pred" / name), pred_map)
    gt_anns.append(dict(image_id=image_id, file_name=name, segments_info=[
        dict(s, category_id=10 + s["category_id"]) for s in gt_segs]))
    pred_anns.append(panoptic_format.annotation(image_id, name, pred_segs, [10 + k for k in IS_THING]))
  with open(tmp_path / "gt.json", "w") as f:
    json.dump(dict(annotations=gt_anns, categories=categories), f)
  pred_json = panoptic_format.write_predictions(str(tmp_path / "pred"), pred_anns, categories)
  pq.main(["--gt-json", str(tmp_path / "gt.json"), "--gt-dir", str(tmp_path / "gt"),
           "--pred-json", pred_json, "--pred-dir", str(tmp_path / "pred")])
  expected, _ = reference_pq(panoptic_pairs)
  printed = capsys.readouterr().out
  assert f"{100 * expected['All']['pq']:8.3f}" in printed
  with open(os.path.splitext(pred_json)[0] + "_pq.json") as f:
    written = json.load(f)
  assert abs(written["All"]["pq"] - expected["All"]["pq"]) < 1e-9


def test_panoptic_png_round_trip(tmp_path):
  ids = np.array([[0, 1, 255], [256, 65536, 16777215]], np.int32)
  panoptic_format.write_id_png(str(tmp_path / "x.png"), ids)
  np.testing.assert_array_equal(panoptic_format.read_id_png(str(tmp_path / "x.png")), ids)
  with pytest.raises(OSError, match="cannot read panoptic PNG"):
    panoptic_format.read_id_png(str(tmp_path / "missing.png"))


# ------------------------------------------------------------------ instance AP
def _random_instances(rng, hw=(32, 40), count=6):
  out = []
  for _ in range(count):
    top, left = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 6)
    mask = np.zeros(hw, bool)
    mask[top:top + rng.integers(4, 16), left:left + rng.integers(4, 16)] = True
    out.append((mask, int(rng.integers(0, 3))))
  return out


@pytest.fixture(scope="module")
def instance_case():
  rng = np.random.default_rng(5)
  images = []
  for image_id in range(1, 7):
    gts = _random_instances(rng)
    crowd = [i == 0 for i in range(len(gts))]
    preds = [(np.roll(m, int(rng.integers(-2, 3)), axis=1), c if rng.random() < 0.8 else (c + 1) % 3,
              float(rng.random())) for m, c in gts] + [
                 (m, c, float(rng.random()) * 0.5) for m, c in _random_instances(rng, count=3)]
    images.append((image_id, gts, crowd, preds))
  return images


def test_instance_ap_equals_direct_cocoeval(instance_case, tmp_path):
  evaluator = evaluation.InstanceAP(num_classes=3)
  gt_images, gt_anns, results = [], [], []
  for image_id, gts, crowd, preds in instance_case:
    gt_list = []
    for (mask, cat), is_crowd in zip(gts, crowd):
      rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
      gt_list.append(dict(category_id=cat, iscrowd=int(is_crowd), segmentation=rle,
                          bbox=mask_utils.toBbox(rle).tolist(), area=float(mask.sum())))
      gt_anns.append(dict(id=len(gt_anns) + 1, image_id=image_id, category_id=cat + 1,
                          iscrowd=int(is_crowd), segmentation=dict(rle, counts=rle["counts"].decode()),
                          bbox=mask_utils.toBbox(rle).tolist(), area=float(mask.sum())))
    gt_images.append(dict(id=image_id, height=32, width=40))
    masks = np.stack([m for m, _, _ in preds])
    evaluator.add_image(image_id, 32, 40, gt_list, np.array([s for _, _, s in preds]),
                        np.array([c for _, c, _ in preds]), masks)
    for m, c, s in preds:
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      results.append(dict(image_id=image_id, category_id=c + 1, score=s,
                          segmentation=dict(rle, counts=rle["counts"].decode())))
  got = evaluator.summary(class_names=["a", "b", "c"])

  with open(tmp_path / "gt.json", "w") as f:
    json.dump(dict(images=gt_images, annotations=gt_anns,
                   categories=[dict(id=k + 1, name=n) for k, n in enumerate("abc")]), f)
  coco = COCO(str(tmp_path / "gt.json"))
  coco_eval = COCOeval(coco, coco.loadRes(results), "segm")
  coco_eval.evaluate()
  coco_eval.accumulate()
  coco_eval.summarize()
  expected = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), 100 * coco_eval.stats[:6]))
  for name, value in expected.items():
    if value < 0:   # COCOeval's "no ground truth in this area range", reported as NaN
      assert np.isnan(got[name]), name
    else:
      assert got[name] == pytest.approx(value, abs=1e-9), name
  assert 5 < got["AP"] < 95
  precision = coco_eval.eval["precision"][:, :, 1, 0, -1]
  assert got["per_class"]["b"] == pytest.approx(100 * precision[precision > -1].mean(), abs=1e-9)


def test_instance_ap_merges_exactly_in_any_order(instance_case):
  """Images split over 'processes' (every other image), merged through JSON: COCOeval sees the
  same sorted images and annotations as with one evaluator, so every number is equal."""
  whole, shards = evaluation.InstanceAP(num_classes=3), [evaluation.InstanceAP(num_classes=3)
                                                         for _ in range(2)]
  for index, (image_id, gts, crowd, preds) in enumerate(instance_case):
    gt_list = [dict(category_id=cat, iscrowd=int(is_crowd),
                    segmentation=evaluation.encode_masks(mask[None])[0])
               for (mask, cat), is_crowd in zip(gts, crowd)]
    args = (image_id, 32, 40, gt_list, np.array([s for _, _, s in preds]),
            np.array([c for _, c, _ in preds]), np.stack([m for m, _, _ in preds]))
    whole.add_image(*args)
    shards[index % 2].add_image(*args)
  merged = evaluation.InstanceAP(num_classes=3)
  merged.load_state_dicts([json.loads(json.dumps(s.state_dict())) for s in reversed(shards)])
  got, expected = merged.summary(), whole.summary()
  assert json.dumps(got) == json.dumps(expected) and 5 < got["AP"] < 95
  with pytest.raises(ValueError, match="more than once"):
    merged.load_state_dicts([shards[0].state_dict(), shards[0].state_dict()])


def test_instance_ap_perfect_predictions_score_100():
  evaluator = evaluation.InstanceAP(num_classes=3)
  gts = _random_instances(np.random.default_rng(1), count=4)
  gt_list = [dict(category_id=c, iscrowd=0, segmentation=evaluation.encode_masks(m[None])[0])
             for m, c in gts]
  evaluator.add_image(1, 32, 40, gt_list, np.ones(4), np.array([c for _, c in gts]),
                      np.stack([m for m, _ in gts]))
  assert evaluator.summary()["AP"] == pytest.approx(100.0)


# ------------------------------------------------------------------ mIoU
def test_miou_equals_plain_reference():
  rng = np.random.default_rng(2)
  confusion = evaluation.ConfusionMatrix(num_classes=6)
  preds, gts = [], []
  for _ in range(4):
    gt = rng.integers(0, 5, (20, 30)).astype(np.uint8)          # class 5 never in the ground truth
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, np.minimum(gt, 5), rng.integers(0, 6, gt.shape))
    confusion.add(pred, gt)
    preds.append(pred)
    gts.append(gt)
  pred, gt = np.concatenate(preds), np.concatenate(gts)
  counted = gt != 255
  ious, accs = [], []
  for c in range(6):
    tp = np.sum((pred == c) & (gt == c))
    in_gt = np.sum(gt == c)
    in_pred = np.sum((pred == c) & counted)
    if in_gt > 0:
      ious.append(tp / (in_gt + in_pred - tp))
      accs.append(tp / in_gt)
  got = confusion.summary()
  assert got["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-9)
  assert got["mACC"] == pytest.approx(100 * np.mean(accs), abs=1e-9)
  assert got["pACC"] == pytest.approx(100 * np.mean(pred[counted] == gt[counted]), abs=1e-9)
  assert np.isnan(got["per_class"]["5"])


def test_miou_rejects_unknown_ground_truth_class():
  with pytest.raises(ValueError, match="outside"):
    evaluation.ConfusionMatrix(num_classes=3).add(np.zeros((2, 2), int), np.full((2, 2), 7))


# ------------------------------------------------------------------ evaluator
def test_evaluator_perfect_prediction_scores_100():
  gt_map = np.zeros((16, 16), np.int32)
  gt_map[:8] = 1
  gt_map[8:, :8] = 2
  gt_map[8:, 8:] = 3
  segments = [dict(id=1, category_id=3, iscrowd=0, isthing=False, area=128),
              dict(id=2, category_id=0, iscrowd=0, isthing=True, area=64),
              dict(id=3, category_id=1, iscrowd=0, isthing=True, area=64)]
  semantic = np.select([gt_map == 1, gt_map == 2, gt_map == 3], [3, 0, 1]).astype(np.uint8)
  masks = np.stack([gt_map == 2, gt_map == 3])
  instances = [dict(category_id=c, iscrowd=0, segmentation=rle, area=64.0)
               for c, rle in zip((0, 1), evaluation.encode_masks(masks))]
  ground_truth = dict(image_id=3, panoptic=gt_map, segments=segments, semantic=semantic,
                      instances=instances)
  assert evaluation.supported_tasks(("panoptic", "semantic"), dict(semantic=semantic)) == ("semantic",)
  evaluator = evaluation.Evaluator(("panoptic", "instance", "semantic"), NUM_CLASSES,
                                   [IS_THING[k] for k in range(NUM_CLASSES)], list("abcde"))
  prediction = dict(panoptic=(gt_map, segments), semantic=semantic,
                    instance=dict(scores=np.array([0.9, 0.8]), labels=np.array([0, 1]), masks=masks))
  evaluator.add(ground_truth, prediction)
  summary = evaluator.summary()
  flat = evaluation.headline(summary)
  assert flat["panoptic/PQ"] == pytest.approx(100) and flat["panoptic/PQ_st"] == pytest.approx(100)
  assert flat["instance/AP"] == pytest.approx(100)
  assert flat["semantic/mIoU"] == pytest.approx(100)
  assert summary["panoptic"]["per_class"]["d"]["PQ"] == pytest.approx(100)
  assert summary["num_images"] == 1
