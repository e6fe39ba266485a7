"""Overlay pictures of panoptic, instance and semantic results (uint8 RGB numpy images)."""
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw


def palette(count: int, seed: int = 0) -> np.ndarray:
  """uint8 [count, 3] bright, well separated colours (golden-ratio hues)."""
  hues = (np.arange(count) * 0.618033988749895 + 0.1 * seed) % 1.0
  image = Image.fromarray(np.stack([hues * 255, np.full(count, 200), np.full(count, 235)], -1)
                          .astype(np.uint8)[None], mode="HSV")
  return np.asarray(image.convert("RGB"))[0]


def _blend(image: np.ndarray, colours: np.ndarray, where: np.ndarray, alpha: float) -> np.ndarray:
  out = image.astype(np.float32)
  out[where] = (1 - alpha) * out[where] + alpha * colours[where]
  return out.astype(np.uint8)


def _boundaries(label_map: np.ndarray) -> np.ndarray:
  edge = np.zeros(label_map.shape, bool)
  edge[:-1] |= label_map[:-1] != label_map[1:]
  edge[:, :-1] |= label_map[:, :-1] != label_map[:, 1:]
  return edge


def _label(image: np.ndarray, texts: Sequence[tuple]) -> np.ndarray:
  """Writes (y, x, text) captions onto the image."""
  if not texts:
    return image
  canvas = Image.fromarray(image)
  draw = ImageDraw.Draw(canvas)
  for y, x, text in texts:
    draw.text((int(x), int(y)), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0),
              anchor="mm")
  return np.asarray(canvas)


def overlay_panoptic(image: np.ndarray, segment_map: np.ndarray, segments: Sequence[dict],
                     class_names: Sequence[str], alpha: float = 0.55) -> np.ndarray:
  """image uint8 [H, W, 3], segment_map int [H, W] (0 = void) -> uint8 [H, W, 3]."""
  colours = np.zeros((int(segment_map.max(initial=0)) + 1, 3), np.uint8)
  colours[1:] = palette(len(colours) - 1)
  for s in segments:
    if not s.get("isthing", True):   # one colour per stuff class, distinct from things
      colours[s["id"]] = palette(len(class_names), seed=5)[s["category_id"]]
  out = _blend(image, colours[segment_map].astype(np.float32), segment_map > 0, alpha)
  out[_boundaries(segment_map)] = 255
  texts = []
  for s in segments:
    ys, xs = np.nonzero(segment_map == s["id"])
    if len(ys):
      texts.append((ys.mean(), xs.mean(), class_names[s["category_id"]]))
  return _label(out, texts)


def overlay_semantic(image: np.ndarray, class_map: np.ndarray, class_names: Sequence[str],
                     ignore_label: int = 255, alpha: float = 0.55) -> np.ndarray:
  """class_map int [H, W] (ignore_label = unlabelled) -> uint8 [H, W, 3]."""
  colours = palette(len(class_names), seed=5)
  valid = class_map != ignore_label
  out = _blend(image, colours[np.where(valid, class_map, 0)].astype(np.float32), valid, alpha)
  out[_boundaries(class_map)] = 255
  texts = []
  for k in np.unique(class_map[valid]):
    ys, xs = np.nonzero(class_map == k)
    texts.append((np.median(ys), np.median(xs), class_names[k]))
  return _label(out, texts)


def overlay_instances(image: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                      class_names: Sequence[str], score_threshold: float = 0.5,
                      alpha: float = 0.55) -> np.ndarray:
  """Instances with score >= threshold (highest score drawn last) -> uint8 [H, W, 3]."""
  out = image.copy()
  keep = np.flatnonzero(np.asarray(scores) >= score_threshold)
  keep = keep[np.argsort(np.asarray(scores)[keep])]
  colours = palette(max(len(keep), 1), seed=2)
  texts = []
  for colour, i in zip(colours, keep):
    mask = np.asarray(masks[i], bool)
    if not mask.any():
      continue
    out = _blend(out, np.broadcast_to(colour.astype(np.float32), out.shape), mask, alpha)
    out[_boundaries(mask.astype(np.int32)) & mask] = 255
    ys, xs = np.nonzero(mask)
    texts.append((ys.mean(), xs.mean(), f"{class_names[labels[i]]} {scores[i]:.2f}"))
  return _label(out, texts)


def panel(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None,
          scale: int = 1) -> np.ndarray:
  """Images of one height side by side (with a title strip), each upscaled by `scale`."""
  tiles = []
  for i, image in enumerate(images):
    tile = Image.fromarray(image)
    if scale > 1:
      tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    tile = np.asarray(tile)
    if titles is not None:
      strip = Image.new("RGB", (tile.shape[1], 16), (30, 30, 30))
      ImageDraw.Draw(strip).text((4, 2), titles[i], fill=(255, 255, 255))
      tile = np.concatenate([np.asarray(strip), tile], 0)
    tiles.append(tile)
    tiles.append(np.full((tiles[-1].shape[0], 4, 3), 255, np.uint8))
  return np.concatenate(tiles[:-1], 1)
