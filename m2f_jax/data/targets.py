"""Training targets from segment-index layers: labels [M] and segment_ids [S, H, W] (TF ops)."""
import tensorflow as tf


def encode_targets(layers, category_id, iscrowd, layer_of, num_layers: int, max_targets: int):
  """Keeps the non-crowd, non-empty segments of the first `num_layers` layers as targets.

  Args:
    layers: [S0, H, W] int32; value i + 1 marks segment i (after augmentation).
    category_id, iscrowd, layer_of: [N] int32 per segment.
    num_layers: S of the batch contract (cfg.data.segment_layers).
    max_targets: M (cfg.data.max_targets).

  Returns:
    labels [M] int32 (-1 = padding), segment_ids [S, H, W] int32 (target m is m + 1),
    num_dropped_layers (targets lost because they need more than S layers: the smaller of
    overlapping instances) and num_dropped_max (targets beyond M), both int32 scalars.
  """
  n = tf.shape(category_id)[0]
  area = tf.math.bincount(tf.reshape(layers, [-1]), minlength=n + 1, maxlength=n + 1,
                          dtype=tf.int32)[1:]
  wanted = tf.logical_and(tf.equal(iscrowd, 0), area > 0)
  over_layers = tf.logical_and(wanted, layer_of >= num_layers)
  keep = tf.logical_and(wanted, layer_of < num_layers)
  rank = tf.cumsum(tf.cast(keep, tf.int32)) - 1
  over_max = tf.logical_and(keep, rank >= max_targets)
  keep = tf.logical_and(keep, rank < max_targets)
  lookup = tf.concat([[0], tf.where(keep, rank + 1, 0)], axis=0)
  s0 = tf.shape(layers)[0]
  layers = tf.pad(layers, [[0, tf.maximum(num_layers - s0, 0)], [0, 0], [0, 0]])[:num_layers]
  segment_ids = tf.gather(lookup, layers)
  slots = tf.boolean_mask(rank, keep)[:, None]
  labels = tf.tensor_scatter_nd_update(tf.fill([max_targets], -1), slots,
                                       tf.boolean_mask(category_id, keep))
  return (labels, segment_ids, tf.reduce_sum(tf.cast(over_layers, tf.int32)),
          tf.reduce_sum(tf.cast(over_max, tf.int32)))
