"""A built-in synthetic panoptic data set, generated offline and deterministically from a seed.

Scenes: two or three stuff regions (sky: smooth gradient; grass: fine stripes; brick: a brick
wall) split by wavy boundaries, with 1 to 5 thing instances on top (disc, square, triangle, ring,
cross) that vary in colour, size, rotation and texture (solid, stripes, checks) and occlude one
another in drawing order. Each thing class has its own band of hues (as real classes have typical
colours), at any saturation and brightness; stuff takes any colour, so neither colour alone
separates things from stuff nor one stuff class from another: texture and shape do. Instances
left with a small visible part are removed from the scene. Panoptic, instance and semantic ground
truth all come from the same index map (the visible parts).

Version 1.1.0 (hue bands, radius 10-24 px at 128 px, 1-5 things); 1.0.0 had random thing colours,
radius 7-22 px and 1-6 things, which a model trained for `make demo` could not classify.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from m2f_jax.data import example_format
from m2f_jax.data import info as info_lib

NUM_THINGS = len(info_lib.SYNTHETIC_THINGS)
_SKY, _GRASS, _BRICK = NUM_THINGS, NUM_THINGS + 1, NUM_THINGS + 2
_MIN_VISIBLE_FRACTION = 0.35
_HUE_BAND = 0.06  # half width of a thing class's hue band; bands are 1 / NUM_THINGS apart


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  """One HSV colour (all in [0, 1]) -> RGB float [3] in 0..255."""
  k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
  return 255.0 * v * (1.0 - s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _thing_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
  """A colour from thing class `cls`'s own band of hues, at any saturation and brightness."""
  hue = (cls / NUM_THINGS + rng.uniform(-_HUE_BAND, _HUE_BAND)) % 1.0
  return _hsv_to_rgb(hue, rng.uniform(0.4, 1.0), rng.uniform(0.45, 1.0))


def _stuff_texture(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                   size: int) -> np.ndarray:
  """A full-frame texture [H, W, 3] float for stuff class `cls`."""
  base = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.4, 0.9))
  other = _hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.7), rng.uniform(0.4, 0.9))
  if cls == _SKY:  # smooth vertical gradient between two colours
    t = (yy / size)[..., None]
    return base * (1.0 - t) + other * t
  if cls == _GRASS:  # fine slanted stripes
    period = rng.uniform(3.0, 5.0) * size / 128
    slant = rng.uniform(-0.5, 0.5)
    wave = np.sin(2 * np.pi * (xx + slant * yy) / period)[..., None]
    return base + 35.0 * wave
  # brick: rows of offset bricks separated by dark mortar lines
  row_h = rng.uniform(7.0, 11.0) * size / 128
  brick_w = 2.2 * row_h
  row = np.floor(yy / row_h)
  shifted = xx + (row % 2) * brick_w / 2
  mortar = ((yy % row_h) < 1.5 * size / 128) | ((shifted % brick_w) < 1.5 * size / 128)
  return np.where(mortar[..., None], 0.45 * base, base)


def _stuff_map(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
               size: int) -> tuple[np.ndarray, list[int]]:
  """Region map [H, W] with values 0..R-1 and the stuff class of each region."""
  classes = list(rng.permutation([_SKY, _GRASS, _BRICK]))
  horizon = size * rng.uniform(0.25, 0.65) + size * rng.uniform(0.03, 0.1) * np.sin(
      2 * np.pi * xx / (size * rng.uniform(0.5, 1.5)) + rng.uniform(0, 2 * np.pi))
  regions = (yy >= horizon).astype(np.int32)
  if rng.uniform() < 0.5:
    split = size * rng.uniform(0.3, 0.7) + size * 0.06 * np.sin(
        2 * np.pi * yy / (size * rng.uniform(0.4, 1.0)) + rng.uniform(0, 2 * np.pi))
    regions = np.where((regions == 1) & (xx >= split), 2, regions)
    return regions, classes
  return regions, classes[:2]


def _thing_mask(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                size: int) -> np.ndarray:
  """Boolean mask [H, W] of one randomly placed, sized and rotated thing of class `cls`."""
  r = rng.uniform(10.0, 24.0) * size / 128
  cy, cx = rng.uniform(0, size), rng.uniform(0, size)
  angle = rng.uniform(0, 2 * np.pi)
  dy, dx = yy - cy, xx - cx
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  dist2 = dx * dx + dy * dy
  if cls == 0:  # disc
    return dist2 <= r * r
  if cls == 1:  # square
    return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
  if cls == 2:  # equilateral triangle with circumradius r
    normals = np.deg2rad([270.0, 30.0, 150.0])
    return np.all([u * np.cos(a) + v * np.sin(a) <= r / 2 for a in normals], axis=0)
  if cls == 3:  # ring
    return (dist2 <= r * r) & (dist2 >= (0.55 * r) ** 2)
  return ((np.abs(u) <= r) & (np.abs(v) <= 0.33 * r)) | (  # cross
      (np.abs(u) <= 0.33 * r) & (np.abs(v) <= r))


def _thing_texture(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                   size: int) -> np.ndarray:
  """Full-frame texture [H, W, 3] for one thing: solid, stripes or checks of two colours."""
  first, second = _thing_colour(cls, rng), _thing_colour(cls, rng)
  kind = rng.integers(3)
  if kind == 0:
    return np.broadcast_to(first, yy.shape + (3,))
  period = rng.uniform(4.0, 8.0) * size / 128
  angle = rng.uniform(0, np.pi)
  along = np.cos(angle) * xx + np.sin(angle) * yy
  if kind == 1:
    pattern = (along // period) % 2
  else:
    across = -np.sin(angle) * xx + np.cos(angle) * yy
    pattern = ((along // period) + (across // period)) % 2
  return np.where(pattern[..., None] > 0, first, second)


def render_scene(rng: np.random.Generator, size: int):
  """Draws one scene.

  Returns:
    image uint8 [size, size, 3]; index map uint16 [size, size] (i + 1 = segment i);
    segments: list of dicts (id, category_id, iscrowd, area, bbox).
  """
  yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  regions, stuff_classes = _stuff_map(rng, yy, xx, size)
  image = np.zeros((size, size, 3))
  for k, cls in enumerate(stuff_classes):
    image = np.where((regions == k)[..., None], _stuff_texture(cls, rng, yy, xx, size), image)
  # Things in drawing order; later ones occlude earlier ones.
  things = []
  for _ in range(rng.integers(1, 6)):
    cls = int(rng.integers(NUM_THINGS))
    things.append((cls, _thing_mask(cls, rng, yy, xx, size), _thing_texture(cls, rng, yy, xx, size)))
  owner = np.full((size, size), -1)
  for t, (_, mask, _) in enumerate(things):
    owner[mask] = t
  kept = [t for t, (_, mask, _) in enumerate(things)
          if mask.sum() > 0 and (owner == t).sum() >= _MIN_VISIBLE_FRACTION * mask.sum()
          and (owner == t).sum() >= 12]
  owner = np.full((size, size), -1)
  for t in kept:
    owner[things[t][1]] = t
    image = np.where(things[t][1][..., None], things[t][2], image)
  image = image * rng.uniform(0.8, 1.15) + rng.normal(0.0, 4.0, image.shape)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)

  index_map = np.zeros((size, size), np.uint16)
  segments = []
  stuff_masks = [(cls, (regions == k) & (owner < 0)) for k, cls in enumerate(stuff_classes)]
  thing_masks = [(things[t][0], owner == t) for t in kept]
  for cls, mask in stuff_masks + thing_masks:
    if not mask.any():
      continue
    segments.append(dict(id=len(segments) + 1, category_id=cls, iscrowd=0,
                         area=float(mask.sum()), bbox=example_format.mask_bbox(mask)))
    index_map[mask] = len(segments)
  return image, index_map, segments


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Sizes and seed of the synthetic set; the config name encodes them."""
  train_size: int = 2000
  validation_size: int = 200
  image_size: int = 128
  seed: int = 0


def synthetic_config(train_size: int = 2000, validation_size: int = 200, image_size: int = 128,
                     seed: int = 0) -> SyntheticConfig:
  """A SyntheticConfig named after its parameters (one tfds directory per parameter set)."""
  for key, value in dict(train_size=train_size, validation_size=validation_size,
                         image_size=image_size).items():
    if int(value) <= 0:
      raise ValueError(f"cfg.data.synthetic.{key} must be positive, got {value}")
  if image_size < 32:
    raise ValueError(f"cfg.data.synthetic.image_size must be at least 32, got {image_size}")
  return SyntheticConfig(
      name=f"seed{seed}_train{train_size}_val{validation_size}_{image_size}px",
      version=tfds.core.Version("1.1.0"), train_size=int(train_size),
      validation_size=int(validation_size), image_size=int(image_size), seed=int(seed))


class M2fSynthetic(tfds.core.GeneratorBasedBuilder):
  """The built-in synthetic panoptic set (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [synthetic_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=example_format.features())

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated offline.
    return {"train": self._generate_examples("train", self.builder_config.train_size),
            "validation": self._generate_examples("validation",
                                                  self.builder_config.validation_size)}

  def _generate_examples(self, split: str, count: int):
    split_key = {"train": 0, "validation": 1}[split]
    config = self.builder_config
    for i in range(count):
      rng = np.random.default_rng([config.seed, split_key, i])
      image, index_map, segments = render_scene(rng, config.image_size)
      yield i, example_format.make_example(image, i, f"{split}_{i:06d}", [index_map], segments)
