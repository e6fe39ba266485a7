"""The criterion against transformers' Mask2FormerLoss (same points), and its edge cases."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as hf

from m2f_jax.losses import criterion
from m2f_jax.losses import point_sampling
from m2f_jax.losses import slot_passes
from tests import torch_reference

NUM_LAYERS, BATCH, QUERIES, CLASSES = 10, 2, 12, 5
HEIGHT, WIDTH, LAYERS_S = 64, 48, 2
NUM_POINTS = 64
LABELS = np.array([[3, -1, 0, 4, -1, 2], [1, 1, -1, -1, 4, -1]], np.int32)  # [B, M]
# Unequal mask and dice weights: the gradient test then tells the two terms' gradients apart.
CLASS_WEIGHT, MASK_WEIGHT, DICE_WEIGHT = 2.0, 5.0, 3.0


def _loss_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = dict(class_weight=CLASS_WEIGHT, mask_weight=MASK_WEIGHT, dice_weight=DICE_WEIGHT,
             no_object_weight=0.1,
             num_points=NUM_POINTS, oversample_ratio=3.0, importance_sample_ratio=0.75,
             matcher="hungarian", slots_per_pass=4)  # M = 6: the last pass reaches past M
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _segment_ids(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """int32 [B, S, H, W]: a random box per real slot, alternating layers (so boxes overlap)."""
  segments = np.zeros((labels.shape[0], LAYERS_S, HEIGHT, WIDTH), np.int32)
  for b, image_labels in enumerate(labels):
    for m in np.flatnonzero(image_labels >= 0):
      y0, x0 = rng.integers(0, HEIGHT - 8), rng.integers(0, WIDTH - 8)
      y1, x1 = rng.integers(y0 + 4, HEIGHT + 1), rng.integers(x0 + 4, WIDTH + 1)
      segments[b, m % LAYERS_S, y0:y1, x0:x1] = m + 1
  return segments


def _points(rng: np.random.Generator, num_slots: int) -> dict:
  num_over, _, num_fresh = point_sampling.num_points_split(NUM_POINTS, 3.0, 0.75)
  return {
      "matcher": rng.uniform(size=(NUM_LAYERS, BATCH, NUM_POINTS, 2)).astype(np.float32),
      "oversampled": rng.uniform(size=(NUM_LAYERS, BATCH, num_slots, num_over, 2)
                                 ).astype(np.float32),
      "fresh": rng.uniform(size=(NUM_LAYERS, BATCH, num_slots, num_fresh, 2)
                           ).astype(np.float32),
  }


def test_point_sampling_equals_grid_sample():
  """Logits and segment-id targets against torch's grid_sample (borders and overlaps included)."""
  rng = np.random.default_rng(3)
  maps = rng.normal(size=(3, 5, 7)).astype(np.float32)
  points = rng.uniform(size=(3, 40, 2)).astype(np.float32)
  points[0, :4] = [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.99, 0.01]]
  grid = torch.from_numpy(2.0 * points[:, :, None] - 1.0)
  shared = torch.from_numpy(np.repeat(2.0 * points[:1, :, None] - 1.0, 3, axis=0))
  expected_shared = torch.nn.functional.grid_sample(
      torch.from_numpy(maps)[:, None], shared, align_corners=False)[:, 0, :, 0].numpy()
  np.testing.assert_allclose(point_sampling.point_sample(jnp.asarray(maps), points[0]),
                             expected_shared.T, atol=1e-6)
  rows = np.array([2, 0, 2])
  expected_each = torch.nn.functional.grid_sample(
      torch.from_numpy(maps[rows])[:, None], grid, align_corners=False)[:, 0, :, 0].numpy()
  np.testing.assert_allclose(point_sampling.point_sample_each(jnp.asarray(maps[rows]), points),
                             expected_each, atol=1e-6)

  segment_ids = rng.integers(0, 4, size=(2, 6, 9)).astype(np.int32)  # S = 2: targets overlap
  dense = np.stack([(segment_ids == m + 1).any(0) for m in range(3)]).astype(np.float32)
  expected = torch.nn.functional.grid_sample(
      torch.from_numpy(dense)[:, None], grid, align_corners=False)[:, 0, :, 0].numpy()
  np.testing.assert_allclose(point_sampling.sample_targets(segment_ids, points, np.arange(3)), expected,
                             atol=1e-6)
  expected_shared = torch.nn.functional.grid_sample(
      torch.from_numpy(dense)[:, None], shared, align_corners=False)[:, 0, :, 0].numpy()
  np.testing.assert_allclose(point_sampling.sample_targets(segment_ids, points[0], np.arange(3)),
                             expected_shared, atol=1e-6)


class _ScriptedRand:
  """Stands in for torch.rand inside transformers' loss: hands out our points in its call order.

  transformers handles the final prediction first, then auxiliary ones 0..L-2; per prediction the
  matcher draws [1, P, 2] per image, then the mask loss draws [N, P_over, 2] and [N, P_fresh, 2] for
  its N matched pairs (image-major, in the matcher's order).
  """

  def __init__(self, points: dict, labels: np.ndarray):
    self.points = points
    self.real_slots = [np.flatnonzero(row >= 0) for row in labels]
    self.matchings = []  # the matcher's outputs in call order
    self._script = self._calls()

  def _calls(self):
    for layer in [NUM_LAYERS - 1] + list(range(NUM_LAYERS - 1)):
      for b in range(BATCH):
        yield self.points["matcher"][layer, b][None]
      pairs = [(b, self.real_slots[b][j]) for b, (_, js) in enumerate(self.matchings[-1])
               for j in js.tolist()]
      images, slots = [p[0] for p in pairs], [p[1] for p in pairs]
      yield self.points["oversampled"][layer, images, slots]
      yield self.points["fresh"][layer, images, slots]

  def rand(self, *size, **unused_kwargs):
    shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
    values = next(self._script)
    assert values.shape == shape, (values.shape, shape)
    return torch.from_numpy(np.ascontiguousarray(values))

  def exhausted(self) -> bool:
    return next(self._script, None) is None


def _torch_loss(class_logits, mask_logits, segment_ids, labels, points):
  """transformers' losses (unweighted), matchings and gradients w.r.t. both logits."""
  config = torch_reference.hf_config(
      num_labels=CLASSES, num_queries=QUERIES, train_num_points=NUM_POINTS, oversample_ratio=3.0,
      importance_sample_ratio=0.75, class_weight=CLASS_WEIGHT, mask_weight=MASK_WEIGHT,
      dice_weight=DICE_WEIGHT,
      no_object_weight=0.1)
  loss_module = hf.Mask2FormerLoss(config, weight_dict={})
  scripted = _ScriptedRand(points, labels)
  matcher_forward = hf.Mask2FormerHungarianMatcher.forward

  def recording_forward(self, *args, **kwargs):
    scripted.matchings.append(matcher_forward(self, *args, **kwargs))
    return scripted.matchings[-1]

  cls = torch.tensor(class_logits, requires_grad=True)
  masks = torch.tensor(mask_logits, requires_grad=True)
  mask_labels, class_labels = [], []
  for b, image_labels in enumerate(labels):
    real = np.flatnonzero(image_labels >= 0)
    dense = np.stack([(segment_ids[b] == m + 1).any(0) for m in real]).astype(np.float32)
    mask_labels.append(torch.from_numpy(dense))
    class_labels.append(torch.from_numpy(image_labels[real].astype(np.int64)))
  aux = [{"masks_queries_logits": masks[layer], "class_queries_logits": cls[layer]}
         for layer in range(NUM_LAYERS - 1)]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hf.torch, "rand", scripted.rand)
    patch.setattr(hf.Mask2FormerHungarianMatcher, "forward", recording_forward)
    losses = loss_module(masks[-1], cls[-1], mask_labels, class_labels, auxiliary_predictions=aux)
  assert scripted.exhausted(), "transformers drew fewer points than scripted"
  weights = {"loss_cross_entropy": CLASS_WEIGHT, "loss_mask": MASK_WEIGHT,
             "loss_dice": DICE_WEIGHT}
  total = sum(weights[name.rsplit("_", 1)[0] if name[-1].isdigit() else name] * value
              for name, value in losses.items())
  total.backward()
  # Reorder the matchings from call order (final, 0, ..., L-2) to layer order.
  matchings = scripted.matchings[1:] + scripted.matchings[:1]
  return ({k: v.item() for k, v in losses.items()}, matchings, total.item(),
          cls.grad.numpy(), masks.grad.numpy())


@pytest.fixture(scope="module")
def loss_and_grad():
  """jit(value_and_grad) of the criterion with injected points; counts its traces."""
  traces = []

  def objective(logits, batch, points):
    traces.append(None)
    outputs = {"class_logits": logits[0], "mask_logits": logits[1]}
    return criterion.mask2former_loss(outputs, batch, jax.random.key(0), _loss_cfg(), CLASSES,
                                      points=points)

  return jax.jit(jax.value_and_grad(objective, has_aux=True)), traces


@pytest.fixture(scope="module")
def parity_case(loss_and_grad):
  rng = np.random.default_rng(0)
  class_logits = rng.normal(size=(NUM_LAYERS, BATCH, QUERIES, CLASSES + 1)).astype(np.float32)
  mask_logits = (3.0 * rng.normal(size=(NUM_LAYERS, BATCH, QUERIES, HEIGHT // 4, WIDTH // 4))
                 ).astype(np.float32)
  segment_ids = _segment_ids(rng, LABELS)
  points = _points(rng, LABELS.shape[1])
  batch = {"labels": LABELS, "segment_ids": segment_ids}
  (total, terms), grads = loss_and_grad[0]((class_logits, mask_logits), batch, points)
  matching = criterion.match_predictions(
      {"class_logits": class_logits, "mask_logits": mask_logits}, batch, points["matcher"],
      _loss_cfg())
  reference = _torch_loss(class_logits, mask_logits, segment_ids, LABELS, points)
  return dict(total=total, terms=terms, grads=grads, matching=matching, reference=reference)


def test_matching_equals_transformers(parity_case):
  query_for_target, matched = (np.asarray(x) for x in parity_case["matching"])
  torch_matchings = parity_case["reference"][1]
  np.testing.assert_array_equal(matched, np.broadcast_to(LABELS >= 0, matched.shape))
  for layer in range(NUM_LAYERS):
    for b in range(BATCH):
      rows, cols = torch_matchings[layer][b]
      slots = np.flatnonzero(LABELS[b] >= 0)[cols.numpy()]
      np.testing.assert_array_equal(query_for_target[layer, b, slots], rows.numpy(),
                                    err_msg=f"layer {layer}, image {b}")


def test_all_thirty_terms_equal_transformers(parity_case):
  torch_losses = parity_case["reference"][0]
  terms = parity_case["terms"]
  assert len(terms) == 3 * NUM_LAYERS
  for layer in range(NUM_LAYERS):
    suffix = "" if layer == NUM_LAYERS - 1 else f"_{layer}"
    for ours, theirs, weight in [("ce", "loss_cross_entropy", CLASS_WEIGHT),
                                 ("mask", "loss_mask", MASK_WEIGHT),
                                 ("dice", "loss_dice", DICE_WEIGHT)]:
      np.testing.assert_allclose(float(terms[f"loss_{ours}_{layer}"]),
                                 weight * torch_losses[theirs + suffix], rtol=1e-5,
                                 err_msg=f"loss_{ours}_{layer}")
  np.testing.assert_allclose(float(parity_case["total"]), parity_case["reference"][2], rtol=1e-5)


def test_gradient_is_finite_and_equals_torch(parity_case):
  grad_class, grad_mask = (np.asarray(g) for g in parity_case["grads"])
  torch_class, torch_mask = parity_case["reference"][3:]
  assert np.all(np.isfinite(grad_class)) and np.all(np.isfinite(grad_mask))
  assert np.abs(grad_mask).max() > 0
  np.testing.assert_allclose(grad_class, torch_class, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(grad_mask, torch_mask, rtol=1e-4, atol=1e-7)


def test_slot_passes_only_split_the_work(parity_case):
  """Other pass sizes (one slot; all M slots at once) give the same losses and gradients."""
  rng = np.random.default_rng(0)  # parity_case's draws, in its order
  class_logits = rng.normal(size=(NUM_LAYERS, BATCH, QUERIES, CLASSES + 1)).astype(np.float32)
  mask_logits = (3.0 * rng.normal(size=(NUM_LAYERS, BATCH, QUERIES, HEIGHT // 4, WIDTH // 4))
                 ).astype(np.float32)
  batch = {"labels": LABELS, "segment_ids": _segment_ids(rng, LABELS)}
  points = _points(rng, LABELS.shape[1])
  for per_pass in (1, LABELS.shape[1]):
    objective = lambda logits, p=per_pass: criterion.mask2former_loss(
        {"class_logits": logits[0], "mask_logits": logits[1]}, batch, jax.random.key(0),
        _loss_cfg(slots_per_pass=p), CLASSES, points=points)[0]
    total, grads = jax.jit(jax.value_and_grad(objective))((class_logits, mask_logits))
    np.testing.assert_allclose(float(total), float(parity_case["total"]), rtol=1e-6)
    for grad, expected in zip(grads, parity_case["grads"]):
      np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_used_pairs_are_packed_across_images():
  """Every used (image, slot) pair once, in ceil(used pairs / per_pass) passes, however the pairs
  spread over the images; the last pass may reach past B x M."""
  def visit(images, slots, real, carry):
    visits, passes = carry
    return visits.at[images, slots].add(real.astype(jnp.int32)), passes + 1

  rng = np.random.default_rng(4)
  for shape, per_pass in (((2, 12), 4), ((2, 3), 4), ((3, 5), 1)):
    used = rng.uniform(size=shape) < 0.5
    used[0] = False  # an image without targets
    used[1, 0] = True
    visits, passes = jax.jit(
        lambda u, p=per_pass: slot_passes.fold_used_pairs(
            visit, u, p, (jnp.zeros(u.shape, jnp.int32), jnp.int32(0))))(used)
    assert int(passes) == -(-used.sum() // per_pass)
    assert np.all(np.asarray(visits)[used] == 1) and np.asarray(visits).max() == 1


def test_drawn_points_do_not_depend_on_the_packing():
  """Each pair's points come from its image and slot: other pass sizes give the same loss."""
  rng = np.random.default_rng(5)
  outputs = {"class_logits": rng.normal(size=(2, BATCH, QUERIES, CLASSES + 1)),
             "mask_logits": rng.normal(size=(2, BATCH, QUERIES, HEIGHT // 4, WIDTH // 4))}
  batch = {"labels": LABELS, "segment_ids": _segment_ids(rng, LABELS)}
  totals = [float(jax.jit(lambda o, p=per_pass: criterion.mask2former_loss(
      o, batch, jax.random.key(0), _loss_cfg(slots_per_pass=p), CLASSES)[0])(outputs))
            for per_pass in (1, 3)]
  np.testing.assert_allclose(totals[0], totals[1], rtol=1e-6)


def test_both_point_selections_give_the_same_loss():
  """'top_k' (accelerators) and 'bisection' (CPU) keep the same points: equal loss and terms."""
  rng = np.random.default_rng(6)
  outputs = {"class_logits": rng.normal(size=(2, BATCH, QUERIES, CLASSES + 1)),
             "mask_logits": rng.normal(size=(2, BATCH, QUERIES, HEIGHT // 4, WIDTH // 4))}
  batch = {"labels": LABELS, "segment_ids": _segment_ids(rng, LABELS)}
  results = [jax.jit(lambda o, s=selection: criterion.mask2former_loss(
      o, batch, jax.random.key(0), _loss_cfg(uncertain_selection=s), CLASSES))(outputs)
             for selection in ("top_k", "bisection")]
  for name, value in results[0][1].items():
    np.testing.assert_allclose(float(results[1][1][name]), float(value), rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(float(results[1][0]), float(results[0][0]), rtol=1e-6)


def test_no_targets_is_finite_and_compiles_once(parity_case, loss_and_grad):
  step, traces = loss_and_grad
  rng = np.random.default_rng(1)
  logits = tuple(rng.normal(size=(NUM_LAYERS, BATCH, QUERIES) + shape).astype(np.float32)
                 for shape in [(CLASSES + 1,), (HEIGHT // 4, WIDTH // 4)])
  batch = {"labels": np.full_like(LABELS, -1),
           "segment_ids": np.zeros((BATCH, LAYERS_S, HEIGHT, WIDTH), np.int32)}
  (total, terms), grads = step(logits, batch, _points(rng, LABELS.shape[1]))
  assert len(traces) == 1, "the criterion was traced again for same-shaped inputs"
  assert np.isfinite(float(total)) and float(total) > 0
  assert all(float(terms[f"loss_mask_{l}"]) == 0 and float(terms[f"loss_dice_{l}"]) == 0
             for l in range(NUM_LAYERS))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  # The class term only pushes towards no-object: its gradient lowers the other logits.
  assert np.all(np.asarray(grads[0])[..., CLASSES] < 0)
  assert not np.any(np.asarray(grads[1]))


def test_drawn_points_bfloat16_and_scipy_matcher():
  """Drawn points: bfloat16 in, float32 out; both solvers agree; the key matters."""
  rng = np.random.default_rng(2)
  layers, queries, num_points = 2, 5, 16
  outputs = {"class_logits": rng.normal(size=(layers, BATCH, queries, CLASSES + 1)),
             "mask_logits": rng.normal(size=(layers, BATCH, queries, HEIGHT // 4, WIDTH // 4))}
  outputs = {k: jnp.asarray(v, jnp.bfloat16) for k, v in outputs.items()}
  batch = {"labels": LABELS[:, :4], "segment_ids": _segment_ids(rng, LABELS[:, :4])}
  losses = {matcher: jax.jit(lambda o, b, r, m=matcher: criterion.mask2former_loss(
      o, b, r, _loss_cfg(num_points=num_points, matcher=m), CLASSES))
            for matcher in ("hungarian", "scipy")}

  total, terms = losses["hungarian"](outputs, batch, jax.random.key(0))
  assert total.dtype == jnp.float32 and np.isfinite(float(total))
  assert all(v.dtype == jnp.float32 for v in terms.values()) and len(terms) == 3 * layers
  scipy_total, _ = losses["scipy"](outputs, batch, jax.random.key(0))
  np.testing.assert_allclose(float(scipy_total), float(total), rtol=1e-6)
  assert float(losses["hungarian"](outputs, batch, jax.random.key(1))[0]) != float(total)


def test_bad_settings_are_rejected():
  outputs = {"class_logits": jnp.zeros((1, 1, 3, CLASSES + 1)),
             "mask_logits": jnp.zeros((1, 1, 3, 4, 4))}
  batch = {"labels": np.zeros((1, 2), np.int32), "segment_ids": np.zeros((1, 1, 16, 16), np.int32)}
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_classes"):
    criterion.mask2former_loss(outputs, batch, key, _loss_cfg(), CLASSES + 1)
  with pytest.raises(ValueError, match="loss.matcher"):
    criterion.mask2former_loss(outputs, batch, key, _loss_cfg(matcher="greedy"), CLASSES)
  with pytest.raises(ValueError, match="slots_per_pass"):
    criterion.mask2former_loss(outputs, batch, key, _loss_cfg(slots_per_pass=0), CLASSES)
  with pytest.raises(ValueError, match="uncertain_selection"):
    criterion.mask2former_loss(outputs, batch, key, _loss_cfg(uncertain_selection="sort"), CLASSES)
  with pytest.raises(ValueError, match="importance_sample_ratio"):
    criterion.mask2former_loss(outputs, batch, key, _loss_cfg(importance_sample_ratio=1.5), CLASSES)
  with pytest.raises(ValueError, match="segment_ids"):
    criterion.mask2former_loss(outputs, {**batch, "segment_ids": np.zeros((1, 16, 16), np.int32)},
                               key, _loss_cfg(), CLASSES)


def test_smallest_k_positions_keep_what_top_k_picks():
  """The bisection selection equals lax.top_k(-values) as a set, ties to the lower index, and
  numbers the kept entries 0..k-1."""
  rng = np.random.default_rng(4)
  values = np.abs(rng.normal(size=(6, 300))).astype(np.float32)
  values[1] = np.round(values[1], 1)  # many ties at the k-th value
  values[2] = 0.0  # all tied
  values[3, :50] = np.inf
  long_rows = np.round(np.abs(rng.normal(size=(2, 70000))), 2).astype(np.float32)  # >= 2**16
  for values, k in [(values, 1), (values, 75), (values, 299), (values, 300), (long_rows, 9000)]:
    position = np.asarray(point_sampling.smallest_k_positions(jnp.asarray(values), k))
    marked = position < k
    _, expected = jax.lax.top_k(-jnp.asarray(values), k)
    for row in range(values.shape[0]):
      np.testing.assert_array_equal(np.sort(position[row][marked[row]]), np.arange(k))
      np.testing.assert_array_equal(np.flatnonzero(marked[row]), np.sort(np.asarray(expected[row])),
                                    err_msg=f"k={k}, row {row}")
