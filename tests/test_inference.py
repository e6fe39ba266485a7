"""Post-processing: hand-built cases, a plain-loop reference of the authors' rules, torch resizing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2f_jax import inference
from m2f_jax.inference import resize


# ------------------------------------------------------------------ plain references (loops, numpy)
def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def reference_panoptic(class_logits, mask_logits, is_thing, threshold=0.8, overlap=0.8):
  """The authors' loop, written plainly: compacted kept queries, argmax, per-query checks."""
  num_classes = class_logits.shape[1] - 1
  probs = _softmax(class_logits.astype(np.float64))
  scores, labels = probs.max(1), probs.argmax(1)
  kept = [q for q in range(len(scores)) if labels[q] != num_classes and scores[q] > threshold]
  seg_map = np.zeros(mask_logits.shape[1:], np.int32)
  segments = []
  if not kept:
    return seg_map, segments
  masks = _sigmoid(mask_logits[kept].astype(np.float64))
  owner = np.argmax(scores[kept][:, None, None] * masks, axis=0)
  stuff_ids = {}
  next_id = 0
  for k, q in enumerate(kept):
    cls = int(labels[q])
    won = int(np.sum(owner == k))
    own = int(np.sum(masks[k] >= 0.5))
    region = (owner == k) & (masks[k] >= 0.5)
    if won == 0 or own == 0 or region.sum() == 0 or won / own < overlap:
      continue
    if not is_thing[cls]:
      if cls in stuff_ids:
        seg_map[region] = stuff_ids[cls]
        continue
      stuff_ids[cls] = next_id + 1
    next_id += 1
    seg_map[region] = next_id
    segments.append(dict(id=next_id, category_id=cls, isthing=bool(is_thing[cls]), score=scores[q]))
  return seg_map, segments


def reference_instance(class_logits, mask_logits, top_k, thing_only=None):
  num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
  probs = _softmax(class_logits.astype(np.float64))[:, :-1].reshape(-1)
  order = np.argsort(-probs, kind="stable")[:top_k]
  out = []
  for flat in order:
    q, cls = flat // num_classes, flat % num_classes
    if thing_only is not None and not thing_only[cls]:
      continue
    binary = mask_logits[q] > 0
    mask_score = (_sigmoid(mask_logits[q].astype(np.float64)) * binary).sum() / (binary.sum() + 1e-6)
    out.append((probs[flat] * mask_score, cls, binary))
  assert num_queries * num_classes >= top_k
  return out


def _random_outputs(rng, num_queries=12, num_classes=5, hw=(24, 20), confident=8):
  """Class logits with some confident queries and smooth random mask logits (regions, not noise)."""
  class_logits = rng.normal(0, 1, (num_queries, num_classes + 1)).astype(np.float32)
  boosted = rng.choice(num_queries, confident, replace=False)
  class_logits[boosted, rng.integers(0, num_classes + 1, confident)] += 7.0
  coarse_hw = (num_queries, hw[0] // 4, hw[1] // 4)
  owner = rng.normal(size=coarse_hw).argmax(0)                  # a random partition among queries
  coarse = rng.normal(0, 3, coarse_hw) - 4.0 + 8.0 * (owner[None] == np.arange(num_queries)[:, None, None])
  coarse = torch.from_numpy(coarse[None].astype(np.float32))
  masks = F.interpolate(coarse, size=hw, mode="bilinear", align_corners=False)[0].numpy()
  return class_logits, masks + 0.37  # offset keeps logits away from exact ties at 0


# ------------------------------------------------------------------ resizing
@pytest.mark.parametrize("in_hw,out_hw", [((6, 5), (24, 20)), ((17, 23), (9, 11)), ((8, 8), (8, 13))])
def test_resize_equals_torch_bilinear(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(3,) + in_hw).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x)[None], size=out_hw, mode="bilinear",
                           align_corners=False)[0].numpy()
  np.testing.assert_allclose(np.asarray(inference.resize_bilinear(x, out_hw)), expected, atol=1e-5)


def test_resize_chain_equals_torch_upsample_crop_resize():
  x = np.random.default_rng(1).normal(size=(4, 8, 12)).astype(np.float32)
  padded, valid, orig = (32, 48), (27, 41), (50, 37)
  up = F.interpolate(torch.from_numpy(x)[None], size=padded, mode="bilinear", align_corners=False)
  expected = F.interpolate(up[:, :, :valid[0], :valid[1]], size=orig, mode="bilinear",
                           align_corners=False)[0].numpy()
  rows, cols = inference.mask_resize_matrices(x.shape[1:], padded, valid, orig)
  got = np.asarray(resize.resize_with_matrices(x, rows, cols))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_rejects_bad_valid_size():
  with pytest.raises(ValueError, match="valid size"):
    inference.mask_resize_matrices((8, 8), (32, 32), (40, 32), (10, 10))


# ------------------------------------------------------------------ panoptic, hand-built
IS_THING = np.array([True, True, False, False])   # K = 4: classes 2, 3 are stuff


def _logits_for(classes, strength=10.0, num_classes=4):
  """Class logits [Q, K+1] with each query confident in `classes[q]` (K = no object)."""
  logits = np.zeros((len(classes), num_classes + 1), np.float32)
  logits[np.arange(len(classes)), classes] = strength
  return logits


def test_panoptic_overlap_drop():
  masks = np.full((2, 8, 8), -5.0, np.float32)
  masks[0, :, :6] = 5.0        # query 0: columns 0..5, slightly more confident class
  masks[1, :, 2:8] = 5.0       # query 1: columns 2..7, loses 4 of its 6 columns to query 0
  logits = _logits_for([0, 1])
  logits[0, 0] += 1.0
  seg_map, segments = inference.panoptic_inference(logits, masks, IS_THING)
  assert [s["category_id"] for s in segments] == [0]
  np.testing.assert_array_equal(seg_map[:, :6], 1)
  np.testing.assert_array_equal(seg_map[:, 6:], 0)   # won by dropped query 1: void


def test_panoptic_stuff_merge_and_thing_split():
  masks = np.full((4, 8, 8), -5.0, np.float32)
  masks[0, :4, :4] = 5.0   # stuff 2
  masks[1, :4, 4:] = 5.0   # thing 0
  masks[2, 4:, :4] = 5.0   # stuff 2 again -> merged into the first stuff-2 segment
  masks[3, 4:, 4:] = 5.0   # thing 0 again -> its own segment
  seg_map, segments = inference.panoptic_inference(_logits_for([2, 0, 2, 0]), masks, IS_THING)
  assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [
      (1, 2, False), (2, 0, True), (3, 0, True)]
  np.testing.assert_array_equal(seg_map[:4, :4], 1)
  np.testing.assert_array_equal(seg_map[4:, :4], 1)
  np.testing.assert_array_equal(seg_map[:4, 4:], 2)
  np.testing.assert_array_equal(seg_map[4:, 4:], 3)


def test_panoptic_empty_when_all_no_object():
  masks = np.full((3, 8, 8), 5.0, np.float32)
  seg_map, segments = inference.panoptic_inference(_logits_for([4, 4, 4]), masks, IS_THING)
  assert segments == [] and not seg_map.any()


def test_panoptic_nothing_above_threshold():
  logits = _logits_for([0, 2], strength=1.0)   # best probability e^1/(e^1+4) ~ 0.4 < 0.8
  seg_map, segments = inference.panoptic_inference(logits, np.full((2, 8, 8), 5.0, np.float32), IS_THING)
  assert segments == [] and not seg_map.any()
  # The same queries pass a lower threshold: the threshold is what removed them.
  _, segments = inference.panoptic_inference(logits, np.full((2, 8, 8), 5.0, np.float32), IS_THING,
                                             object_mask_threshold=0.3)
  assert len(segments) == 1


def test_panoptic_pixels_below_half_stay_void():
  masks = np.full((1, 8, 8), 5.0, np.float32)
  masks[0, 0, :] = -1.0    # won by the query but below 0.5 sigmoid
  masks[0, 1, 0] = -5.0    # own area 55, won 64: share > 0.8, kept
  seg_map, _ = inference.panoptic_inference(_logits_for([1]), masks, IS_THING)
  assert seg_map[0].sum() == 0 and seg_map[1, 0] == 0 and seg_map[2:].min() == 1


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_matches_plain_loop(seed):
  rng = np.random.default_rng(seed)
  class_logits, masks = _random_outputs(rng, num_classes=4)
  seg_map, segments = inference.panoptic_inference(class_logits, masks, IS_THING)
  ref_map, ref_segments = reference_panoptic(class_logits, masks, IS_THING)
  np.testing.assert_array_equal(seg_map, ref_map)
  assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [
      (s["id"], s["category_id"], s["isthing"]) for s in ref_segments]
  np.testing.assert_allclose([s["score"] for s in segments], [s["score"] for s in ref_segments],
                             rtol=1e-5)


def test_panoptic_random_cases_are_not_trivial():
  counts = [len(reference_panoptic(*_random_outputs(np.random.default_rng(s), num_classes=4),
                                   IS_THING)[1]) for s in range(6)]
  assert max(counts) >= 2 and min(counts) >= 1


def test_panoptic_valid_region_excludes_outside_pixels():
  rng = np.random.default_rng(3)
  class_logits, masks = _random_outputs(rng, num_classes=4)
  seg_map, segments = inference.panoptic_inference(class_logits, masks, IS_THING, valid_hw=(16, 13))
  ref_map, ref_segments = reference_panoptic(class_logits, masks[:, :16, :13], IS_THING)
  np.testing.assert_array_equal(seg_map[:16, :13], ref_map)
  assert not seg_map[16:].any() and not seg_map[:, 13:].any()
  assert [s["category_id"] for s in segments] == [s["category_id"] for s in ref_segments]


# ------------------------------------------------------------------ instance and semantic
@pytest.mark.parametrize("thing_only", [None, IS_THING])
def test_instance_matches_plain_loop(thing_only):
  class_logits, masks = _random_outputs(np.random.default_rng(7), num_classes=4)
  result = inference.instance_inference(class_logits, masks, top_k=20, thing_only_mask=thing_only)
  expected = reference_instance(class_logits, masks, 20, thing_only)
  assert len(result["scores"]) == len(expected) > 0
  if thing_only is not None:
    assert len(expected) < 20 and IS_THING[result["labels"]].all()
  np.testing.assert_allclose(result["scores"], [e[0] for e in expected], rtol=1e-5)
  np.testing.assert_array_equal(result["labels"], [e[1] for e in expected])
  np.testing.assert_array_equal(result["masks"], np.stack([e[2] for e in expected]))


def test_semantic_matches_einsum():
  class_logits, masks = _random_outputs(np.random.default_rng(8), num_classes=4)
  expected = np.einsum("qk,qhw->khw", _softmax(class_logits.astype(np.float64))[:, :-1],
                       _sigmoid(masks.astype(np.float64)))
  got = np.asarray(inference.semantic_inference(class_logits, masks))
  assert got.shape == (4,) + masks.shape[1:]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ full per-image chain
@pytest.fixture(scope="module")
def chain_case():
  rng = np.random.default_rng(11)
  class_logits, feature_masks = _random_outputs(rng, num_classes=4, hw=(8, 12))
  padded, valid, orig = (32, 48), (29, 40), (45, 61)
  up = F.interpolate(torch.from_numpy(feature_masks)[None], size=padded, mode="bilinear",
                     align_corners=False)
  at_orig = F.interpolate(up[:, :, :valid[0], :valid[1]], size=orig, mode="bilinear",
                          align_corners=False)[0].numpy()
  return class_logits, feature_masks, padded, valid, orig, up[0].numpy(), at_orig


def test_postprocessor_all_tasks_equal_reference_chain(chain_case):
  class_logits, feature_masks, padded, valid, orig, _, at_orig = chain_case
  post = inference.PostProcessor(("panoptic", "instance", "semantic"), IS_THING, top_k=15, bucket=64)
  out = post(class_logits, feature_masks, padded, valid, orig)
  ref_map, ref_segments = reference_panoptic(class_logits, at_orig, IS_THING)
  np.testing.assert_array_equal(out["panoptic"][0], ref_map)
  assert len(out["panoptic"][1]) == len(ref_segments) > 0
  expected = reference_instance(class_logits, at_orig, 15, IS_THING)
  np.testing.assert_allclose(out["instance"]["scores"], [e[0] for e in expected], rtol=1e-4)
  assert out["instance"]["masks"].shape[1:] == orig
  sem_ref = np.einsum("qk,qhw->khw", _softmax(class_logits.astype(np.float64))[:, :-1],
                      _sigmoid(at_orig.astype(np.float64))).argmax(0)
  np.testing.assert_array_equal(out["semantic"], sem_ref)


def test_postprocessor_semantic_only_resizes_scores(chain_case):
  """Semantic-only models infer at the input size, then resize the class scores (authors' order)."""
  class_logits, feature_masks, padded, valid, orig, up, _ = chain_case
  post = inference.PostProcessor(("semantic",), IS_THING, bucket=16)
  out = post(class_logits, feature_masks, padded, valid, orig, semantic_scores=True)
  scores = np.einsum("qk,qhw->khw", _softmax(class_logits.astype(np.float64))[:, :-1],
                     _sigmoid(up[:, :valid[0], :valid[1]].astype(np.float64)))
  expected = F.interpolate(torch.from_numpy(scores)[None], size=orig, mode="bilinear",
                           align_corners=False)[0].numpy()
  assert out["semantic_scores"].shape == (4,) + orig
  np.testing.assert_allclose(out["semantic_scores"], expected, atol=1e-5)
  np.testing.assert_array_equal(inference.semantic_labels(out["semantic_scores"]), expected.argmax(0))


def test_postprocessor_rejects_class_count_mismatch(chain_case):
  class_logits, feature_masks, padded, valid, orig, _, _ = chain_case
  post = inference.PostProcessor(("panoptic",), np.array([True, False]))
  with pytest.raises(ValueError, match="classes"):
    post(class_logits, feature_masks, padded, valid, orig)
