"""Segments images with a trained model and writes pictures and COCO panoptic files.

  python -m m2f_jax.tools.predict --config configs/NAME.py --checkpoint PATH IMAGE... --out DIR

For each IMAGE (any format PIL reads) writes DIR/NAME_{panoptic,instance,semantic}.png overlays (the
tasks of cfg.eval.tasks) and, with panoptic on, DIR/panoptic/NAME.png (COCO panoptic PNG, id =
R + 256 G + 256^2 B) listed in DIR/panoptic/panoptic.json (category ids are the contiguous 0..K-1).
PATH is a training workdir, a checkpoint step directory or a converted variables directory.
"""
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/synthetic.py.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint step directory or "
                                  "converted variables directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_INSTANCE_THRESHOLD = flags.DEFINE_float("instance_score_threshold", 0.5,
                                         "Instances drawn in the overlay have at least this score.")


def read_images(paths: Sequence[str]) -> list:
  """uint8 RGB arrays [H, W, 3]; raises ValueError listing every unreadable file."""
  images, errors = [], []
  for path in paths:
    try:
      with Image.open(path) as image:
        images.append(np.asarray(image.convert("RGB")))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      errors.append(f"  {path}: {e}")
  if errors:
    raise ValueError("cannot read these images:\n" + "\n".join(errors))
  return images


def prepare_input(image: np.ndarray, data_cfg, divisor: int = 32):
  """The authors' test resize (shortest side min_size_test, longest <= max_size_test), padded.

  Returns the padded uint8 image [Hp, Wp, 3] (cfg.data.eval_pad_size when it fits, else the next
  multiple of `divisor`; padding = pixel mean, 0 after normalising) and its valid size.
  """
  from m2f_jax.data import transforms  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  new_h, new_w = (int(v) for v in transforms.shortest_edge_size(
      height, width, data_cfg.min_size_test, data_cfg.max_size_test))
  pad_h, pad_w = (int(v) for v in data_cfg.eval_pad_size)
  if new_h > pad_h or new_w > pad_w:
    pad_h, pad_w = -(-new_h // divisor) * divisor, -(-new_w // divisor) * divisor
  resized = np.asarray(transforms.resize_image(image, (new_h, new_w)))
  return resized, (pad_h, pad_w)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give at least one IMAGE path")
  if not (_CHECKPOINT.value and _OUT.value):
    raise app.UsageError("--checkpoint and --out are required")
  try:
    images = read_images(paths)
  except ValueError as e:
    sys.exit(f"error: {e}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import models  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import loop  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import panoptic_format  # pylint: disable=g-import-not-at-top
  from m2f_jax.inference import postprocess  # pylint: disable=g-import-not-at-top
  from m2f_jax.inference import visualize  # pylint: disable=g-import-not-at-top

  cfg = _CONFIG.value
  info = data.get_dataset_info(cfg.data)
  mesh = parallel.make_mesh()
  model = models.build_model(cfg)
  variables = loop.load_variables(cfg, model, _CHECKPOINT.value, mesh)
  predict = jax.jit(lambda v, x: {k: o[-1] for k, o in model.apply(v, x, train=False).items()})
  post = postprocess.PostProcessor(tuple(cfg.eval.tasks), info.is_thing, cfg.eval.object_mask_threshold,
                                   cfg.eval.overlap_threshold, cfg.eval.top_k)
  mean = np.asarray(cfg.model.pixel_mean, np.float32)
  out_dir = _OUT.value
  os.makedirs(out_dir, exist_ok=True)
  annotations = []
  for path, image in zip(paths, images):
    name = os.path.splitext(os.path.basename(path))[0]
    resized, (pad_h, pad_w) = prepare_input(image, cfg.data)
    padded = np.broadcast_to(mean, (1, pad_h, pad_w, 3)).copy()
    padded[0, :resized.shape[0], :resized.shape[1]] = resized
    out = jax.device_get(predict(variables, jnp.asarray(padded)))
    result = post(out["class_logits"][0], out["mask_logits"][0], (pad_h, pad_w), resized.shape[:2],
                  image.shape[:2])
    written = []
    if "panoptic" in result:
      segment_map, segments = result["panoptic"]
      os.makedirs(os.path.join(out_dir, "panoptic"), exist_ok=True)
      panoptic_format.write_id_png(os.path.join(out_dir, "panoptic", name + ".png"), segment_map)
      annotations.append(panoptic_format.annotation(name, name + ".png", segments,
                                                    list(range(info.num_classes))))
      written.append(("panoptic", visualize.overlay_panoptic(image, segment_map, segments,
                                                             info.class_names)))
    if "instance" in result:
      inst = result["instance"]
      written.append(("instance", visualize.overlay_instances(
          image, inst["scores"], inst["labels"], inst["masks"], info.class_names,
          _INSTANCE_THRESHOLD.value)))
    if "semantic" in result:
      written.append(("semantic", visualize.overlay_semantic(image, result["semantic"], info.class_names)))
    for task, picture in written:
      Image.fromarray(picture).save(os.path.join(out_dir, f"{name}_{task}.png"))
    print(f"{path}: " + ", ".join(f"{name}_{task}.png" for task, _ in written))
  if annotations:
    categories = [dict(id=k, name=n, isthing=int(t))
                  for k, (n, t) in enumerate(zip(info.class_names, info.is_thing))]
    json_path = panoptic_format.write_predictions(os.path.join(out_dir, "panoptic"), annotations,
                                                  categories)
    print(f"COCO panoptic results: {json_path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
