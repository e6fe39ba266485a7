"""Reading user images of any PIL mode as upright uint8 RGB, and finding them in directories.

Conversions to RGB [H, W, 3] uint8, after the EXIF orientation is applied:
  'L', 'P', 'PA', '1', 'CMYK', 'YCbCr', 'RGB', 'RGBA', 'LA': PIL's own conversion (palettes
      looked up, R = 255 (1 - C)(1 - K) and alike for CMYK, alpha dropped: the colour channels
      are kept as stored, as PIL and torchvision read them);
  'I;16', 'I;16L', 'I;16B', 'I;16N', 'I' (16-bit PNGs open as these): 0..65535 scaled to 0..255
      (v / 257, rounded, so an 8-bit image stored as 16-bit, v * 257, reads back exactly);
      PIL's own conversion would clip them to 255 (an almost white picture);
  'F' (floating point): values clipped to 0..255 and rounded.
"""
import os
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of a PIL image of any mode (see the module docstring); no EXIF handling."""
  if image.mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.float64)
    gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode == "F":
    gray = np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # PIL's advice for palettes with transparency
  return np.asarray(image.convert("RGB"))


def read_rgb(path: str) -> np.ndarray:
  """The upright (EXIF orientation applied) uint8 RGB image [H, W, 3] in the file `path`.

  Raises:
    ValueError: naming the file, when it is missing, not an image or damaged.
  """
  try:
    with Image.open(path) as image:
      image.load()
      upright = ImageOps.exif_transpose(image)
      return to_rgb(upright)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None


def expand_inputs(paths: Sequence[str]) -> list[str]:
  """The files named in `paths`, each directory replaced by the images under it (recursively,
  sorted; files whose extension is not in IMAGE_EXTENSIONS are skipped there, never when named)."""
  files = []
  for path in paths:
    if not os.path.isdir(path):
      files.append(path)
      continue
    found = []
    for folder, subdirs, names in os.walk(path):
      subdirs.sort()
      found.extend(os.path.join(folder, n) for n in names
                   if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
      raise ValueError(f"{path}: a directory without images ({', '.join(IMAGE_EXTENSIONS)})")
    files.extend(sorted(found))
  return files


def output_names(files: Sequence[str]) -> list[str]:
  """A distinct output name per input file: its path relative to the inputs' common directory,
  without extension ('dir/a' for 'in/dir/a.jpg'); names that several inputs share keep their
  extension ('a_jpg', 'a_png'), and any still shared get a number ('a_jpg_2')."""
  absolute = [os.path.abspath(f) for f in files]
  root = os.path.commonpath([os.path.dirname(p) for p in absolute])
  stems, extensions = [], []
  for path in absolute:
    stem, ext = os.path.splitext(os.path.relpath(path, root))
    stems.append(stem.replace(os.sep, "/"))
    extensions.append(ext.lstrip(".").lower())
  names, taken = [], set()
  for stem, ext in zip(stems, extensions):
    name = f"{stem}_{ext}" if stems.count(stem) > 1 and ext else stem
    candidate, n = name, 1
    while candidate in taken:
      n += 1
      candidate = f"{name}_{n}"
    taken.add(candidate)
    names.append(candidate)
  return names


def image_ids(names: Sequence[str]) -> list:
  """COCO image ids for output names: the integer of an all-digit file name ('000000142238' ->
  142238) when no other input has the same number, else the name itself (a string)."""
  numbers = [int(os.path.basename(n)) if os.path.basename(n).isdigit() else None for n in names]
  return [num if num is not None and numbers.count(num) == 1 else name
          for name, num in zip(names, numbers)]
