"""tf.data input pipelines: endless, resumable training batches and padded evaluation batches.

Training order and augmentation are a pure function of (cfg.seed, process index, element index):
each epoch reads this process's record files in an order drawn from (seed, process, epoch),
interleaves them record by record and shuffles the stream through a buffer seeded the same way, and
every example's augmentation draws from a stateless seed keyed on its element counter. A run
restarted at `start_step` skips to its epoch and position without decoding anything and then
yields exactly the batches an uninterrupted run would (with the same number of processes).
"""
import logging
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from m2f_jax.data import ground_truth as ground_truth_lib
from m2f_jax.data import info as info_lib
from m2f_jax.data import registry
from m2f_jax.data import targets
from m2f_jax.data import transforms

_AUGMENTS = ("lsj", "ade20k", "cityscapes", "none")


def _hide_accelerators() -> None:
  """Keeps TensorFlow off GPUs so it never takes accelerator memory from JAX."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised; devices were hidden by an earlier call.
    pass


def _skip_decoding():
  return {"image": tfds.decode.SkipDecoding(), "layers": tfds.decode.SkipDecoding()}


def _records(builder, split: str) -> tf.data.Dataset:
  """The encoded examples of a split, in file order. Without tfds's in-memory cache of small
  splits: runs stop reading mid-epoch, and TensorFlow then warns it dropped a partial cache."""
  return builder.as_dataset(split=split, shuffle_files=False, decoders=_skip_decoding(),
                            read_config=tfds.ReadConfig(try_autocache=False))


def _decode(example: dict) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded image and layer PNGs -> image [H, W, 3] uint8, layers [S0, H, W] int32."""
  image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
  layers = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1, dtype=tf.uint16)[..., 0],
                     example["layers"], fn_output_signature=tf.uint16)
  return image, tf.cast(layers, tf.int32)


def _round_up(size: int, multiple: int = 32) -> int:
  return -(-int(size) // multiple) * multiple


def _check_data_cfg(cfg) -> None:
  d = cfg.data
  if d.augment not in _AUGMENTS:
    raise ValueError(f"cfg.data.augment must be one of {_AUGMENTS}, got {d.augment!r}")
  for key in ("image_size", "eval_pad_size"):
    size = tuple(d[key])
    if len(size) != 2 or min(size) <= 0 or any(s % 32 for s in size):
      raise ValueError(f"cfg.data.{key} must be two positive multiples of 32, got {size}")
  if d.augment in ("ade20k", "cityscapes") and not d.min_size_train:
    raise ValueError(f"cfg.data.min_size_train is empty; augment={d.augment!r} needs sizes")
  if d.augment == "lsj" and not 0 < d.min_scale <= d.max_scale:
    raise ValueError(f"cfg.data.min_scale/max_scale must satisfy 0 < min <= max, got "
                     f"{d.min_scale}, {d.max_scale}")
  pad_h, pad_w = tuple(d.eval_pad_size)
  if pad_h < d.min_size_test or pad_w < d.max_size_test:
    raise ValueError(
        f"cfg.data.eval_pad_size={(pad_h, pad_w)} cannot hold a wide image at the test sizes "
        f"(shortest side {d.min_size_test}, longest {d.max_size_test}); set it to at least "
        f"({_round_up(d.min_size_test)}, {_round_up(d.max_size_test)}), or "
        f"({_round_up(d.max_size_test)}, {_round_up(d.max_size_test)}) for tall images too")
  if d.segment_layers < 1 or d.max_targets < 1:
    raise ValueError("cfg.data.segment_layers and cfg.data.max_targets must be >= 1")


def _train_example_fn(cfg, process_index: int):
  """(element index, raw example) -> one training example of the batch contract."""
  d = cfg.data
  image_size = tuple(int(s) for s in d.image_size)

  def fn(index, example):
    seed = tf.random.experimental.stateless_fold_in(
        tf.constant([cfg.seed, process_index], tf.int32), index)
    image, layers = _decode(example)
    seg = example["segments"]
    if d.augment == "lsj":
      image, layers, valid_hw = transforms.large_scale_jitter(
          image, layers, seed, image_size, d.min_scale, d.max_scale)
    elif d.augment in ("ade20k", "cityscapes"):
      image, layers, valid_hw = transforms.semantic_style_augment(
          image, layers, seed, image_size, tuple(d.min_size_train), d.max_size_train,
          tf.concat([[-1], seg["category_id"]], 0), d.crop_single_category_max_area)
    else:
      valid_hw = tf.shape(image)[:2]
      tf.debugging.assert_less_equal(valid_hw, tf.constant(image_size), message=(
          "augment='none' needs images no larger than cfg.data.image_size"))
      image, layers = transforms.pad_to(image, layers, image_size, transforms.PAD_IMAGE_VALUE)
    labels, segment_ids, dropped_layers, dropped_max = targets.encode_targets(
        layers, seg["category_id"], seg["iscrowd"], seg["layer"], d.segment_layers,
        d.max_targets)
    image = tf.ensure_shape(image, image_size + (3,))
    segment_ids = tf.ensure_shape(segment_ids, (d.segment_layers,) + image_size)
    return {"image": image, "valid_hw": tf.cast(valid_hw, tf.int32), "labels": labels,
            "segment_ids": segment_ids, "_dropped_layers": dropped_layers,
            "_dropped_max": dropped_max}

  return fn


class _DropCounter:
  """Counts targets the pipeline had to drop and logs the totals as they grow."""

  def __init__(self, cfg):
    self.cfg, self.layers, self.max, self._next_log = cfg, 0, 0, 1

  def add(self, batch: dict) -> None:
    self.layers += int(batch.pop("_dropped_layers").sum())
    self.max += int(batch.pop("_dropped_max").sum())
    if self.layers + self.max >= self._next_log:
      logging.warning(
          "Input pipeline dropped %d targets that overlap more than cfg.data.segment_layers=%d "
          "layers allow (the smaller ones) and %d beyond cfg.data.max_targets=%d so far.",
          self.layers, self.cfg.data.segment_layers, self.max, self.cfg.data.max_targets)
      self._next_log = 2 * (self.layers + self.max)


_FILES_READ_AT_ONCE = 16


def _epoch_records_fn(builder, split, seed_base: int, shuffle_buffer: int):
  """epoch (int64 scalar) -> that epoch's serialized records of `split`, in the epoch's order.

  The record files (the parts of them in `split`) are put in a random order per epoch, read
  16 at a time one record from each in turn, and the stream goes through a shuffle buffer; file
  order and buffer both draw from (seed_base + epoch), so every epoch has its own order.
  """
  file_format = str(builder.info.file_format or "tfrecord").lower()
  if "tfrecord" not in file_format:
    raise ValueError(f"{builder.name} in {builder.data_dir} is stored as {file_format}; the training "
                     "pipeline reads tfrecord files: prepare the data set again in a new data_dir")
  instructions = builder.info.splits[split].file_instructions
  files = tf.constant([str(i.filename) for i in instructions])
  skips = tf.constant([int(i.skip) for i in instructions], tf.int64)
  takes = tf.constant([int(i.take) if i.take >= 0 else int(i.examples_in_shard) - int(i.skip)
                       for i in instructions], tf.int64)

  def read(filename, skip, take):
    return tf.data.TFRecordDataset(filename).skip(skip).take(take)

  def epoch(e):
    seed = tf.stack([tf.constant(seed_base, tf.int64), e])
    order = tf.argsort(tf.random.stateless_uniform([len(instructions)], seed))
    parts = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(skips, order), tf.gather(takes, order)))
    records = parts.interleave(read, cycle_length=min(_FILES_READ_AT_ONCE, len(instructions)),
                               block_length=1)
    return records.shuffle(shuffle_buffer, seed=seed_base + e, reshuffle_each_iteration=False)

  return epoch


def train_iterator(cfg, start_step: int = 0, process_index: int = 0, process_count: int = 1):
  """Endless iterator of training batches (numpy dicts of the batch contract) for this process.

  Args:
    cfg: the run config (cfg.data, cfg.seed, cfg.batch_size).
    start_step: the first step to produce; batches equal those of an uninterrupted run.
    process_index, process_count: this host's share of the data and of cfg.batch_size.

  Yields:
    {'image' uint8 [B, H, W, 3], 'valid_hw' int32 [B, 2], 'labels' int32 [B, M],
     'segment_ids' int32 [B, S, H, W]} with B = cfg.batch_size // process_count.
  """
  _hide_accelerators()
  _check_data_cfg(cfg)
  if cfg.batch_size % process_count:
    raise ValueError(f"cfg.batch_size={cfg.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch = cfg.batch_size // process_count
  builder = registry.get_builder(cfg.data)
  registry.check_split(builder, cfg.data, cfg.data.get("train_split", "train"))
  split = tfds.even_splits(cfg.data.get("train_split", "train"), n=process_count)[process_index]
  num_examples = builder.info.splits[split].num_examples
  if num_examples == 0:
    raise ValueError(f"Split {split} of {cfg.data.name} has no examples")
  start = start_step * local_batch
  first_epoch, offset = divmod(start, num_examples)
  seed_base = (cfg.seed * 2**20 + process_index) * 2**20
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
      _epoch_records_fn(builder, split, seed_base, max(min(cfg.data.shuffle_buffer, num_examples), 1)))
  ds = ds.skip(offset).map(
      lambda record: builder.info.features.deserialize_example(record, decoders=_skip_decoding()),
      num_parallel_calls=cfg.data.num_parallel_calls, deterministic=True)
  ds = ds.enumerate(start=start)
  ds = ds.map(_train_example_fn(cfg, process_index),
              num_parallel_calls=cfg.data.num_parallel_calls, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(cfg.data.prefetch)
  counter = _DropCounter(cfg)
  for batch in ds.as_numpy_iterator():
    counter.add(batch)
    yield batch


def _eval_example_fn(cfg):
  d = cfg.data
  pad_size = tuple(int(s) for s in d.eval_pad_size)
  pad_value = tuple(int(round(m)) for m in cfg.model.pixel_mean)  # ~0 after normalising

  def fn(example):
    image, layers = _decode(example)
    resized, valid_hw, shrunk = transforms.eval_resize(image, d.min_size_test, d.max_size_test,
                                                       pad_size, pad_value)
    return {"image": tf.ensure_shape(resized, pad_size + (3,)), "valid_hw": valid_hw,
            "_shrunk": shrunk,
            "orig_hw": tf.shape(image)[:2], "image_id": example["image_id"],
            "layers": layers, "segments": example["segments"]}

  return fn


def _filler(pad_size) -> dict:
  return {"image": np.zeros(tuple(pad_size) + (3,), np.uint8),
          "valid_hw": np.asarray(pad_size, np.int32), "orig_hw": np.asarray(pad_size, np.int32),
          "image_id": np.int64(-1)}


def eval_iterator(cfg, split: str | None = None, process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None):
  """Evaluation batches (numpy) of this process's share of `split`, in a fixed padded shape.

  Every process yields the same number of batches; the last ones are completed with filler
  examples (is_real False, image_id -1, ground truth {'image_id': -1}).

  Yields:
    {'image' uint8 [B, Hp, Wp, 3] (padded with the pixel mean), 'valid_hw' int32 [B, 2],
     'orig_hw' int32 [B, 2], 'image_id' int64 [B], 'is_real' bool [B],
     'ground_truth': list of B dicts (see ground_truth.ground_truth)}.
  """
  _hide_accelerators()
  _check_data_cfg(cfg)
  split = split or cfg.data.get("eval_split", "validation")
  if batch_size is None:
    if cfg.eval.batch_size % process_count:
      raise ValueError(f"cfg.eval.batch_size={cfg.eval.batch_size} is not divisible by the "
                       f"{process_count} processes")
    batch_size = cfg.eval.batch_size // process_count
  builder = registry.get_builder(cfg.data)
  if split not in builder.info.splits:
    raise ValueError(f"{cfg.data.name} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits)}")
  total = builder.info.splits[split].num_examples
  if cfg.eval.get("max_images", None):
    total = min(total, int(cfg.eval.max_images))
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
  ds = _records(builder, split)
  ds = ds.take(total).shard(process_count, process_index)
  ds = ds.map(_eval_example_fn(cfg), num_parallel_calls=cfg.data.num_parallel_calls,
              deterministic=True).prefetch(cfg.data.prefetch)
  dataset_info = info_lib.get_dataset_info(cfg.data)
  pad_size = tuple(cfg.data.eval_pad_size)
  examples = ds.as_numpy_iterator()
  shrunk = 0
  for _ in range(num_batches):
    rows, truths = [], []
    for example in examples:
      shrunk += int(example.pop("_shrunk"))
      rows.append(example)
      truths.append(ground_truth_lib.ground_truth(example, dataset_info))
      if len(rows) == batch_size:
        break
    is_real = [True] * len(rows) + [False] * (batch_size - len(rows))
    while len(rows) < batch_size:
      rows.append(_filler(pad_size))
      truths.append({"image_id": -1})
    yield {
        "image": np.stack([r["image"] for r in rows]),
        "valid_hw": np.stack([r["valid_hw"] for r in rows]).astype(np.int32),
        "orig_hw": np.stack([r["orig_hw"] for r in rows]).astype(np.int32),
        "image_id": np.asarray([r["image_id"] for r in rows], np.int64),
        "is_real": np.asarray(is_real),
        "ground_truth": truths,
    }
  if shrunk:
    logging.warning(
        "%d evaluation images did not fit cfg.data.eval_pad_size=%s at the test sizes (shortest "
        "side %d, longest %d) and were evaluated smaller; a frame of (%d, %d) holds every image.",
        shrunk, pad_size, cfg.data.min_size_test, cfg.data.max_size_test,
        _round_up(cfg.data.max_size_test), _round_up(cfg.data.max_size_test))
