"""Evaluation of a checkpoint on a data set: batched forward over the mesh, per-image
post-processing, metrics, test-time augmentation for semantic segmentation, overlay pictures."""
import json
import os
import time
from typing import Any, Iterable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from PIL import Image

from m2f_jax import parallel
from m2f_jax.evaluation import evaluator as evaluator_lib
from m2f_jax.evaluation import merge
from m2f_jax.inference import postprocess
from m2f_jax.inference import visualize


# ---------------------------------------------------------------- model and variables
def load_checkpoint(cfg: ml_collections.ConfigDict, model: Any, path: str, mesh) -> tuple[dict, str, str]:
  """Variables of a train workdir (newest intact step), a step directory or a converted variables
  dir, checked against the model built from `cfg` and replicated over the mesh; with the
  directory read and a sentence saying which checkpoint that is and why."""
  from m2f_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda k: state_lib.init_variables(model, k, tuple(cfg.data.image_size)),
                            jax.random.key(0))
  sharding = parallel.replicated(mesh)
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
  return checkpointing.restore_newest_variables(path, target)


def load_variables(cfg: ml_collections.ConfigDict, model: Any, path: str, mesh) -> dict:
  """The variables of `load_checkpoint`."""
  return load_checkpoint(cfg, model, path, mesh)[0]


def make_predict_fn(model: Any, mesh):
  """jit(variables, images [B, H, W, 3], valid_hw [B, 2]) -> final class logits [B, Q, K+1], mask logits [B, Q, h, w].

  Pixels outside valid_hw are 0 after normalising, as the authors pad at test time.
  """
  def predict(variables, images, valid_hw):
    out = model.apply(variables, images, train=False, valid_hw=valid_hw)
    return out["class_logits"][-1], out["mask_logits"][-1]
  data = parallel.data_sharded(mesh)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh), data, data),
                 out_shardings=(data, data))


def _local_images(array: jax.Array) -> list:
  """This process's rows of a batch-sharded array, each left on its device, in batch order."""
  rows = []
  for shard in sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0):
    rows.extend(shard.data[i] for i in range(shard.data.shape[0]))
  return rows


# ---------------------------------------------------------------- test-time augmentation
def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def augmented_images(images: np.ndarray, valid_hw: np.ndarray, scale: float, flip: bool,
                     divisor: int = 32):
  """Rescales (bilinear) and optionally mirrors the valid region of each padded image.

  Returns images uint8 [B, H', W', 3] padded to a multiple of `divisor` and their valid sizes.
  """
  height, width = images.shape[1:3]
  frame = (_round_up(max(1, round(height * scale)), divisor),
           _round_up(max(1, round(width * scale)), divisor))
  out = np.zeros((len(images), *frame, 3), np.uint8)
  sizes = np.zeros((len(images), 2), np.int32)
  for i, (image, (vh, vw)) in enumerate(zip(images, valid_hw)):
    crop = image[:vh, :vw]
    if flip:
      crop = crop[:, ::-1]
    new_hw = (max(1, round(vh * scale)), max(1, round(vw * scale)))
    if new_hw != (vh, vw):
      crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(new_hw[::-1], Image.BILINEAR))
    out[i, :new_hw[0], :new_hw[1]] = crop
    sizes[i] = new_hw
  return out, sizes


# ---------------------------------------------------------------- the loop
def write_scalars(logdir: str, step: int, scalars: dict) -> None:
  """TensorBoard scalars {name: value} at `step` in the event files of `logdir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
      data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.write(name, tf.constant(value, tf.float32), metadata=metadata)
  writer.close()


class _Writer:
  """metrics JSON and TensorBoard scalars under the output directory."""

  def __init__(self, out_dir: str):
    self.out_dir = out_dir

  def write(self, summary: dict, step: int, checkpoint: str) -> str:
    path = os.path.join(self.out_dir, "eval_metrics.json")
    with open(path, "w") as f:
      json.dump(dict(step=step, checkpoint=checkpoint, **summary), f, indent=2)
    write_scalars(os.path.join(self.out_dir, "tensorboard", "eval"), step,
                  evaluator_lib.headline(summary))
    return path


def checkpoint_step(path: str) -> int:
  """The training step of a step directory (its name), else of the newest step under it, else 0."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit():
    return int(os.path.basename(path))
  for candidate in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(candidate):
      steps = [int(n) for n in os.listdir(candidate) if n.isdigit()]
      if steps:
        return max(steps)
  return 0


def evaluate(cfg: ml_collections.ConfigDict, model: Any, variables: dict, batches: Iterable[dict],
             dataset_info: Any, mesh, out_dir: Optional[str] = None, step: int = 0,
             checkpoint: str = "", num_visualize: int = 0, total_batches: Optional[int] = None,
             progress: bool = True, predict: Optional[Any] = None) -> dict:
  """Runs every supported task of cfg.eval.tasks over `batches` (eval batch contract).

  Every process of a multi-host job calls it with its own shard of the split (the same number of
  batches everywhere); the metrics are merged exactly across processes and every process returns
  the summary of the whole split. `predict` (from `make_predict_fn`) lets repeated evaluations
  reuse one compiled forward pass.

  Returns the Evaluator summary (percent); with `out_dir`, the chief process writes
  eval_metrics.json, TensorBoard scalars and `num_visualize` overlay pictures (eval_NNNN.png).
  """
  eval_cfg = cfg.eval
  tta_scales = tuple(float(s) for s in eval_cfg.tta_scales)
  if any(s <= 0 for s in tta_scales):
    raise ValueError(f"eval.tta_scales must be positive, got {tta_scales}")
  use_tta = bool(tta_scales) or bool(eval_cfg.tta_flip)
  writes = out_dir is not None and jax.process_index() == 0
  if writes:
    os.makedirs(out_dir, exist_ok=True)
  tasks = evaluator_lib.tasks_of_kind(tuple(eval_cfg.tasks), dataset_info.kind)
  if not tasks:
    raise ValueError(f"the data set {cfg.data.name!r} supports none of "
                     f"eval.tasks={tuple(eval_cfg.tasks)}")
  evaluator = evaluator_lib.Evaluator(tasks, dataset_info.num_classes, dataset_info.is_thing,
                                      dataset_info.class_names, cfg.data.ignore_label)
  post = tta_post = None
  single_scale = tuple(t for t in tasks if not (use_tta and t == "semantic"))
  if single_scale:
    post = postprocess.PostProcessor(single_scale, dataset_info.is_thing,
                                     eval_cfg.object_mask_threshold, eval_cfg.overlap_threshold,
                                     eval_cfg.top_k)
  if use_tta and "semantic" in tasks:
    # Resize order as the authors: logits first whenever panoptic or instance output is made.
    tta_post = postprocess.PostProcessor(("semantic",), dataset_info.is_thing,
                                         resize_first=post is not None and post.resize_first)
  if predict is None:
    predict = make_predict_fn(model, mesh)
  num_batches = num_done = 0
  started = time.perf_counter()
  bar = tqdm.tqdm(batches, total=total_batches, desc="eval", unit="batch",
                  disable=not (progress and jax.process_index() == 0))
  for batch in bar:
    num_batches += 1
    if post is not None:
      predictions = _predict_batch(predict, variables, batch, post, mesh)
    else:
      predictions = [{} for _ in batch["image"]]
    if tta_post is not None:
      semantic = _semantic_tta(predict, variables, batch, tta_post, mesh, tta_scales or (1.0,),
                               bool(eval_cfg.tta_flip))
      for prediction, labels in zip(predictions, semantic):
        if labels is not None:
          prediction["semantic"] = labels
    for i, prediction in enumerate(predictions):
      if not batch["is_real"][i]:
        continue
      gt = batch["ground_truth"][i]
      evaluator.add(gt, prediction)
      if writes and num_done < num_visualize:
        _save_overlay(out_dir, num_done, batch["image"][i], batch["valid_hw"][i], gt, prediction,
                      dataset_info.class_names)
      num_done += 1
    bar.set_postfix(images=num_done)
  if num_batches == 0:
    raise ValueError("the evaluation data set yielded no batches")
  evaluator = merge.merge_evaluators(evaluator)
  summary = evaluator.summary()
  summary["seconds"] = time.perf_counter() - started
  if writes:
    path = _Writer(out_dir).write(summary, step, checkpoint)
    summary["metrics_path"] = path
  return summary


def _predict_batch(predict, variables, batch: dict, post: postprocess.PostProcessor, mesh) -> list:
  """Forward pass on the global batch, then per-image post-processing on each image's device."""
  inputs = parallel.global_batch({"image": batch["image"], "valid_hw": batch["valid_hw"]}, mesh)
  class_logits, mask_logits = predict(variables, inputs["image"], inputs["valid_hw"])
  class_rows, mask_rows = _local_images(class_logits), _local_images(mask_logits)
  padded_hw = batch["image"].shape[1:3]
  return [post(class_rows[i], mask_rows[i], padded_hw, batch["valid_hw"][i], batch["orig_hw"][i])
          if batch["is_real"][i] else {} for i in range(len(batch["image"]))]


def _semantic_tta(predict, variables, batch: dict, post: postprocess.PostProcessor, mesh,
                  scales: Sequence[float], flip: bool) -> list:
  """Semantic class maps from scores averaged over scales (and mirrored copies)."""
  totals = [None] * len(batch["image"])
  for scale in scales:
    for mirrored in ((False, True) if flip else (False,)):
      images, valid = augmented_images(batch["image"], batch["valid_hw"], scale, mirrored)
      inputs = parallel.global_batch({"image": images, "valid_hw": valid}, mesh)
      class_logits, mask_logits = predict(variables, inputs["image"], inputs["valid_hw"])
      class_rows, mask_rows = _local_images(class_logits), _local_images(mask_logits)
      for i in range(len(images)):
        if not batch["is_real"][i]:
          continue
        scores = post(class_rows[i], mask_rows[i], images.shape[1:3], valid[i], batch["orig_hw"][i],
                      semantic_scores=True)["semantic_scores"]
        if mirrored:
          scores = scores[:, :, ::-1]
        totals[i] = scores if totals[i] is None else totals[i] + scores
  return [postprocess.semantic_labels(t) if t is not None else None for t in totals]


def _save_overlay(out_dir: str, index: int, image: np.ndarray, valid_hw, gt: dict, prediction: dict,
                  class_names: Sequence[str]) -> None:
  """eval_NNNN.png: input, then ground truth and prediction for each task (small images enlarged)."""
  orig_hw = next(iter(v.shape for k, v in gt.items() if k in ("panoptic", "semantic")), None)
  crop = np.asarray(image)[:valid_hw[0], :valid_hw[1]]
  if orig_hw is None:
    orig_hw = crop.shape[:2]
  scale = max(1, 256 // max(orig_hw))
  picture = np.asarray(Image.fromarray(crop).resize((orig_hw[1] * scale, orig_hw[0] * scale),
                                                    Image.BILINEAR))

  def big(label_map):
    return np.repeat(np.repeat(np.asarray(label_map), scale, axis=-2), scale, axis=-1)

  tiles, titles = [picture], ["image"]
  if "panoptic" in prediction:
    if "panoptic" in gt:
      tiles.append(visualize.overlay_panoptic(picture, big(gt["panoptic"]), gt["segments"], class_names))
      titles.append("panoptic ground truth")
    segment_map, segments = prediction["panoptic"]
    tiles.append(visualize.overlay_panoptic(picture, big(segment_map), segments, class_names))
    titles.append("panoptic")
  if "instance" in prediction:
    inst = prediction["instance"]
    tiles.append(visualize.overlay_instances(picture, inst["scores"], inst["labels"], big(inst["masks"]),
                                             class_names))
    titles.append("instances (score > 0.5)")
  if "semantic" in prediction:
    tiles.append(visualize.overlay_semantic(picture, big(prediction["semantic"]), class_names))
    titles.append("semantic")
  Image.fromarray(visualize.panel(tiles, titles)).save(os.path.join(out_dir, f"eval_{index:04d}.png"))
