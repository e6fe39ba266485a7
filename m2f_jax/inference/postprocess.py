"""Per-image post-processing of model outputs for every task, at the original image size.

The resize chain of the authors (upsample to the padded input, crop the valid region, resize to the
original size) is applied as two matrix products, then the task cores run in one jitted function.
Output sizes are rounded up to a bucket (`bucket` pixels) so that data sets with many image sizes
compile a handful of functions; pixels outside the image are excluded from every area and cropped away.
"""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.inference import instance as instance_lib
from m2f_jax.inference import panoptic as panoptic_lib
from m2f_jax.inference import resize
from m2f_jax.inference import semantic as semantic_lib

TASKS = ("panoptic", "instance", "semantic")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _padded_rows(matrix: np.ndarray, rows: int) -> np.ndarray:
  out = np.zeros((rows, matrix.shape[1]), np.float32)
  out[:matrix.shape[0]] = matrix
  return out


@functools.partial(jax.jit, static_argnames=("tasks", "object_mask_threshold", "overlap_threshold",
                                             "top_k", "semantic_scores"))
def _resize_then_infer(class_logits, mask_logits, rows, cols, out_hw, is_thing, tasks,
                       object_mask_threshold, overlap_threshold, top_k, semantic_scores):
  """The authors' order when panoptic or instance output is made: resize logits, then infer."""
  logits = resize.resize_with_matrices(mask_logits, rows, cols)                 # [Q, Hb, Wb]
  out = {}
  if "semantic" in tasks:
    scores = semantic_lib.semantic_inference(class_logits, logits)
    out["semantic_scores" if semantic_scores else "semantic"] = (
        scores if semantic_scores else scores.argmax(0).astype(jnp.int32))
  if "panoptic" in tasks:
    out["panoptic"] = panoptic_lib.panoptic_core(class_logits, logits, is_thing, object_mask_threshold,
                                                 overlap_threshold, out_hw)
  if "instance" in tasks:
    out["instance"] = instance_lib.instance_core(class_logits, logits, top_k, out_hw)
  return out


@functools.partial(jax.jit, static_argnames=("semantic_scores",))
def _infer_then_resize(class_logits, mask_logits, rows_valid, cols_valid, rows_out, cols_out,
                       semantic_scores):
  """The authors' order for semantic-only models: scores at the valid input size, then resize."""
  logits = resize.resize_with_matrices(mask_logits, rows_valid, cols_valid)
  scores = resize.resize_with_matrices(semantic_lib.semantic_inference(class_logits, logits),
                                       rows_out, cols_out)
  return {"semantic_scores": scores} if semantic_scores else {
      "semantic": scores.argmax(0).astype(jnp.int32)}


class PostProcessor:
  """Turns one image's final-layer outputs into panoptic / instance / semantic results."""

  def __init__(self, tasks: Sequence[str], is_thing: Sequence[bool], object_mask_threshold: float = 0.8,
               overlap_threshold: float = 0.8, top_k: int = 100, bucket: int = 64,
               resize_first: Optional[bool] = None):
    """`resize_first`: resize mask logits before inference (default: as the authors, whenever
    panoptic or instance output is made; semantic-only models resize the class scores instead)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
      raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
    if top_k < 1 or bucket < 1:
      raise ValueError(f"top_k and bucket must be positive, got {top_k} and {bucket}")
    self.tasks = tuple(t for t in TASKS if t in tasks)
    self.is_thing = np.asarray(is_thing, bool)
    self.object_mask_threshold = float(object_mask_threshold)
    self.overlap_threshold = float(overlap_threshold)
    self.top_k = int(top_k)
    self.bucket = int(bucket)
    if resize_first is None:
      resize_first = "panoptic" in self.tasks or "instance" in self.tasks
    self.resize_first = bool(resize_first)

  def _bucketed(self, size: int) -> int:
    return _round_up(size, self.bucket)

  def __call__(self, class_logits: jax.Array, mask_logits: jax.Array, padded_hw: Sequence[int],
               valid_hw: Sequence[int], orig_hw: Sequence[int], semantic_scores: bool = False) -> dict:
    """class_logits [Q, K+1], mask_logits [Q, h, w] of an input padded to `padded_hw`.

    Returns (numpy, original size H0 x W0): 'panoptic': (segment_map int32 [H0, W0], segments),
    'instance': {scores [N], labels [N], masks bool [N, H0, W0]} (thing classes only when panoptic
    is also on), 'semantic': int32 [H0, W0] class map. With `semantic_scores=True`, semantic is
    returned instead as 'semantic_scores' float32 [K, H0, W0] (for test-time augmentation to sum).
    """
    if class_logits.shape[-1] - 1 != self.is_thing.shape[0]:
      raise ValueError(f"the model predicts {class_logits.shape[-1] - 1} classes but the data set has "
                       f"{self.is_thing.shape[0]}")
    orig_h, orig_w = int(orig_hw[0]), int(orig_hw[1])
    mask_logits = jnp.asarray(mask_logits, jnp.float32)  # a bfloat16 model's masks too
    feature_hw = mask_logits.shape[-2:]
    out_rows, out_cols = self._bucketed(orig_h), self._bucketed(orig_w)
    if self.resize_first:
      rows, cols = resize.mask_resize_matrices(feature_hw, padded_hw, valid_hw, (orig_h, orig_w))
      result = _resize_then_infer(
          class_logits, mask_logits, _padded_rows(rows, out_rows), _padded_rows(cols, out_cols),
          jnp.asarray([orig_h, orig_w], jnp.int32), jnp.asarray(self.is_thing), self.tasks,
          self.object_mask_threshold, self.overlap_threshold, self.top_k, semantic_scores)
    else:
      valid_h, valid_w = int(valid_hw[0]), int(valid_hw[1])
      rows_valid = _padded_rows(resize.interpolation_matrix(feature_hw[0], int(padded_hw[0]))[:valid_h],
                                self._bucketed(valid_h))
      cols_valid = _padded_rows(resize.interpolation_matrix(feature_hw[1], int(padded_hw[1]))[:valid_w],
                                self._bucketed(valid_w))
      rows_out = _padded_rows(resize.interpolation_matrix(valid_h, orig_h), out_rows)
      cols_out = _padded_rows(resize.interpolation_matrix(valid_w, orig_w), out_cols)
      rows_out = np.pad(rows_out, ((0, 0), (0, rows_valid.shape[0] - valid_h)))
      cols_out = np.pad(cols_out, ((0, 0), (0, cols_valid.shape[0] - valid_w)))
      result = _infer_then_resize(class_logits, mask_logits, rows_valid, cols_valid, rows_out, cols_out,
                                  semantic_scores)
    return self._to_host(result, orig_h, orig_w)

  def _to_host(self, result: dict, orig_h: int, orig_w: int) -> dict:
    result = jax.device_get(result)
    out = {}
    if "semantic_scores" in result:
      out["semantic_scores"] = np.asarray(result["semantic_scores"])[:, :orig_h, :orig_w]
    if "semantic" in result:
      out["semantic"] = np.asarray(result["semantic"])[:orig_h, :orig_w]
    if "panoptic" in result:
      arrays = result["panoptic"]
      out["panoptic"] = (np.asarray(arrays["segment_map"])[:orig_h, :orig_w],
                         panoptic_lib.segments_from_arrays(arrays, self.is_thing))
    if "instance" in result:
      instances = dict(result["instance"])
      instances["masks"] = np.asarray(instances["masks"])[:, :orig_h, :orig_w]
      out["instance"] = instance_lib.filter_instances(
          instances, self.is_thing if "panoptic" in self.tasks else None)
    return out


def semantic_labels(scores: np.ndarray) -> np.ndarray:
  """Class scores [K, H, W] (e.g. summed over test-time augmentations) -> int32 class map [H, W]."""
  return np.argmax(scores, axis=0).astype(np.int32)
