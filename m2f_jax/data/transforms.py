"""Training and evaluation transforms as TensorFlow ops (the authors' detectron2 augmentations).

Every transform takes the image [H, W, 3] uint8 and the segment-index layers [S0, H, W] int32
(see `example_format`) and moves both alike: bilinear with antialiasing for the image (as PIL's
bilinear resize in detectron2), nearest neighbour for the layers. Randomness is stateless: each
transform takes a seed [2] int32, so the same seed gives the same result in any run.
"""
import tensorflow as tf

PAD_IMAGE_VALUE = 128   # LSJ and semantic-crop padding of the authors (before normalising)


def _split(seed, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _uniform(seed, minval=0.0, maxval=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval)


def shortest_edge_size(height, width, short, max_size):
  """detectron2 ResizeShortestEdge output (h, w) int32: shortest side `short`, longest <= max."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  short, max_size = tf.cast(short, tf.float32), tf.cast(max_size, tf.float32)
  scale = short / tf.minimum(h, w)
  new_h, new_w = h * scale, w * scale
  shrink = tf.minimum(1.0, max_size / tf.maximum(new_h, new_w))
  new_h, new_w = new_h * shrink, new_w * shrink
  return tf.cast(new_h + 0.5, tf.int32), tf.cast(new_w + 0.5, tf.int32)


def resize_image(image, size) -> tf.Tensor:
  """Image [H, W, 3] uint8 -> [h, w, 3] uint8, bilinear with antialiasing."""
  out = tf.image.resize(tf.cast(image, tf.float32), size, "bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def resize_layers(layers, size) -> tf.Tensor:
  """Index layers [S, H, W] int32 -> [S, h, w], nearest neighbour."""
  out = tf.image.resize(tf.transpose(layers, [1, 2, 0]), size, "nearest")
  return tf.transpose(out, [2, 0, 1])


def resize(image, layers, size):
  return resize_image(image, size), resize_layers(layers, size)


def random_flip(image, layers, seed):
  """Horizontal flip with probability 0.5."""
  flip = _uniform(seed) < 0.5
  return (tf.where(flip, image[:, ::-1], image), tf.where(flip, layers[:, :, ::-1], layers))


def pad_to(image, layers, size, image_value):
  """Pads bottom/right to `size` (h, w): image with `image_value` (scalar or per channel)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  paddings = [[0, size[0] - h], [0, size[1] - w]]
  value = tf.cast(tf.broadcast_to(tf.constant(image_value), [3]), tf.int32)
  image = tf.cast(tf.pad(tf.cast(image, tf.int32) - value, paddings + [[0, 0]]) + value, tf.uint8)
  layers = tf.pad(layers, [[0, 0]] + paddings)
  return image, layers


def crop(image, layers, offset, size):
  return (image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]],
          layers[:, offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]])


def large_scale_jitter(image, layers, seed, image_size, min_scale, max_scale):
  """COCO LSJ: flip, resize by a scale of image_size, random crop, pad (image 128).

  Returns:
    image [Ho, Wo, 3] uint8, layers [S, Ho, Wo], valid_hw [2] int32 (the unpadded part).
  """
  flip_seed, scale_seed, crop_seed = _split(seed, 3)
  image, layers = random_flip(image, layers, flip_seed)
  out = tf.constant(image_size, tf.float32)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = _uniform(scale_seed, min_scale, max_scale)
  factor = tf.reduce_min(out * scale / hw)      # detectron2 ResizeScale
  new_hw = tf.cast(tf.round(hw * factor), tf.int32)
  image, layers = resize(image, layers, new_hw)
  out_hw = tf.constant(image_size, tf.int32)
  # detectron2 FixedSizeCrop: one uniform draw scales both offsets.
  max_offset = tf.maximum(new_hw - out_hw, 0)
  offset = tf.cast(tf.round(tf.cast(max_offset, tf.float32) * _uniform(crop_seed)), tf.int32)
  valid_hw = tf.minimum(new_hw, out_hw)
  image, layers = crop(image, layers, offset, valid_hw)
  image, layers = pad_to(image, layers, image_size, PAD_IMAGE_VALUE)
  return image, layers, valid_hw


def _crop_is_balanced(layers, offset, size, category_lut, max_ratio):
  """True if no single category covers more than max_ratio of the crop's labelled pixels."""
  window = layers[0, offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
  labels = tf.gather(category_lut, tf.reshape(window, [-1]))
  labels = tf.boolean_mask(labels, labels >= 0)
  counts = tf.math.bincount(labels)
  counts = tf.boolean_mask(counts, counts > 0)
  total = tf.reduce_sum(counts)
  return tf.logical_and(tf.size(counts) > 1, tf.cast(tf.reduce_max(
      tf.concat([counts, [0]], 0)), tf.float32) < max_ratio * tf.cast(total, tf.float32))


def random_crop_category_area(image, layers, seed, crop_size, category_lut, max_ratio):
  """detectron2 RandomCrop_CategoryAreaConstraint ('absolute'): up to 10 tries for a crop in
  which no category exceeds max_ratio of the pixels (none when max_ratio >= 1)."""
  hw = tf.shape(image)[:2]
  size = tf.minimum(tf.constant(crop_size, tf.int32), hw)
  seeds = tf.random.experimental.stateless_split(seed, 10)

  def offset_for(i):
    return tf.cast(tf.floor(tf.random.stateless_uniform([2], seeds[i]) *
                            tf.cast(hw - size + 1, tf.float32)), tf.int32)

  offset = offset_for(0)
  if max_ratio < 1.0:
    def cond(i, off):
      return tf.logical_and(i < 10, tf.logical_not(
          _crop_is_balanced(layers, off, size, category_lut, max_ratio)))

    _, offset = tf.while_loop(cond, lambda i, off: (i + 1, offset_for(tf.minimum(i, 9))),
                              (tf.constant(1), offset))
  return crop(image, layers, offset, size)


def _convert(image, alpha=1.0, beta=0.0):
  return tf.floor(tf.clip_by_value(image * alpha + beta, 0.0, 255.0))


def color_aug_ssd(image, seed):
  """detectron2 ColorAugSSDTransform: brightness +-32, contrast and saturation 0.5..1.5, hue
  +-18 (of 180), each applied with probability 0.5; contrast before or after the HSV steps."""
  seeds = _split(seed, 9)
  x = tf.cast(image, tf.float32)

  def brightness(x):
    return tf.cond(_uniform(seeds[0]) < 0.5,
                   lambda: _convert(x, beta=_uniform(seeds[1], -32.0, 32.0)), lambda: x)

  def contrast(x):
    return tf.cond(_uniform(seeds[2]) < 0.5,
                   lambda: _convert(x, alpha=_uniform(seeds[3], 0.5, 1.5)), lambda: x)

  def saturation(x):
    return tf.cond(_uniform(seeds[4]) < 0.5, lambda: _convert(tf.image.adjust_saturation(
        x / 255.0, _uniform(seeds[5], 0.5, 1.5)) * 255.0), lambda: x)

  def hue(x):
    shift = tf.cast(tf.random.stateless_uniform([], seeds[7], -18, 19, dtype=tf.int32),
                    tf.float32)
    return tf.cond(_uniform(seeds[6]) < 0.5, lambda: _convert(tf.image.adjust_hue(
        x / 255.0, shift / 180.0) * 255.0), lambda: x)

  x = brightness(x)
  x = tf.cond(_uniform(seeds[8]) < 0.5, lambda: hue(saturation(contrast(x))),
              lambda: contrast(hue(saturation(x))))
  return tf.cast(x, tf.uint8)


def semantic_style_augment(image, layers, seed, image_size, min_sizes, max_size,
                           category_lut, max_ratio):
  """ADE20K / Cityscapes: random shortest side, crop (category constraint), colour jitter,
  flip, pad to image_size (image 128). Returns image, layers, valid_hw like LSJ."""
  size_seed, crop_seed, color_seed, flip_seed = _split(seed, 4)
  sizes = tf.constant(min_sizes, tf.int32)
  short = sizes[tf.random.stateless_uniform([], size_seed, 0, len(min_sizes), dtype=tf.int32)]
  new_hw = shortest_edge_size(tf.shape(image)[0], tf.shape(image)[1], short, max_size)
  image, layers = resize(image, layers, tf.stack(new_hw))
  image, layers = random_crop_category_area(image, layers, crop_seed, image_size, category_lut,
                                            max_ratio)
  image = color_aug_ssd(image, color_seed)
  image, layers = random_flip(image, layers, flip_seed)
  valid_hw = tf.shape(image)[:2]
  image, layers = pad_to(image, layers, image_size, PAD_IMAGE_VALUE)
  return image, layers, valid_hw


def eval_resize(image, min_size, max_size, pad_size, pad_value):
  """Test-time resize (shortest side min_size, longest <= max_size), pad to pad_size.

  An image whose resized size does not fit pad_size (e.g. a portrait image in a landscape frame)
  is scaled down further, keeping its aspect ratio, until it fits.

  Returns image [Hp, Wp, 3] uint8, valid_hw [2] int32 and `shrunk` (bool scalar): whether the
  image had to be made smaller than the test sizes ask.
  """
  new_h, new_w = shortest_edge_size(tf.shape(image)[0], tf.shape(image)[1], min_size, max_size)
  pad_h, pad_w = (int(s) for s in pad_size)
  fit = tf.minimum(pad_h / tf.cast(new_h, tf.float64), pad_w / tf.cast(new_w, tf.float64))
  shrunk = fit < 1.0

  def scaled(length, limit):
    smaller = tf.cast(tf.math.floor(tf.cast(length, tf.float64) * fit), tf.int32)
    return tf.where(shrunk, tf.clip_by_value(smaller, 1, limit), length)

  new_h, new_w = scaled(new_h, pad_h), scaled(new_w, pad_w)
  image = resize_image(image, tf.stack([new_h, new_w]))
  dummy_layers = tf.zeros([0, new_h, new_w], tf.int32)
  image, _ = pad_to(image, dummy_layers, pad_size, pad_value)
  return image, tf.stack([new_h, new_w]), shrunk
