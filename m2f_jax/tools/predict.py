"""Segments images with a trained model and writes pictures and COCO panoptic files.

  python -m m2f_jax.tools.predict --config configs/NAME.py --checkpoint PATH --out DIR INPUT...

INPUT is an image file (any format and mode PIL reads; EXIF orientation is applied, 16-bit PNGs
are scaled to 8 bits, see m2f_jax.image_io) or a directory (every image under it). Each image gets
a distinct output NAME: its path relative to the inputs' common directory, without extension
('dir/a' for 'in/dir/a.jpg'; inputs that would share one keep their extension, 'a_jpg' and 'a_png').
Writes DIR/NAME_{panoptic,instance,semantic}.png overlays (the tasks of cfg.eval.tasks) and, with
panoptic on, DIR/panoptic/NAME.png (COCO panoptic PNG, id = R + 256 G + 256^2 B) listed in
DIR/panoptic/panoptic.json with the data set's own category ids and, for all-digit file names
(COCO's '000000142238.jpg'), integer image ids, so that `python -m m2f_jax.evaluation.pq` scores
it against the data set's JSON. PATH is a training workdir, a checkpoint step directory or a
converted variables directory.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from m2f_jax import command_line
from m2f_jax import image_io

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/synthetic.py.",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, checkpoint step directory or "
                                  "converted variables directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_INSTANCE_THRESHOLD = flags.DEFINE_float("instance_score_threshold", 0.5,
                                         "Instances drawn in the overlay have at least this score.")


def read_images(paths) -> list:
  """uint8 RGB arrays [H, W, 3], upright; raises ValueError listing every unreadable file."""
  images, errors = [], []
  for path in paths:
    try:
      images.append(image_io.read_rgb(path))
    except ValueError as e:
      errors.append(f"  {e}")
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
  if not argv[1:]:
    raise app.UsageError("give at least one IMAGE file or directory")
  if not (_CHECKPOINT.value and _OUT.value):
    raise app.UsageError("--checkpoint and --out are required")
  try:
    paths = image_io.expand_inputs(argv[1:])
    images = read_images(paths)
  except ValueError as e:
    sys.exit(f"error: {e}")
  names = image_io.output_names(paths)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import models  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import loop  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import panoptic_format  # pylint: disable=g-import-not-at-top
  from m2f_jax.inference import postprocess  # pylint: disable=g-import-not-at-top
  from m2f_jax.inference import visualize  # pylint: disable=g-import-not-at-top

  cfg = _CONFIG.value
  data.resolve_num_classes(cfg)  # a custom data set's class count
  info = data.get_dataset_info(cfg.data)
  mesh = parallel.make_mesh()
  model = models.build_model(cfg)
  try:
    variables, _, why = loop.load_checkpoint(cfg, model, _CHECKPOINT.value, mesh)
  except (FileNotFoundError, variables_io.DamagedCheckpointError) as e:
    sys.exit(f"error: {e}")
  print(f"predicting with {why}", flush=True)
  predict = jax.jit(lambda v, x: {k: o[-1] for k, o in model.apply(v, x, train=False).items()})
  post = postprocess.PostProcessor(tuple(cfg.eval.tasks), info.is_thing, cfg.eval.object_mask_threshold,
                                   cfg.eval.overlap_threshold, cfg.eval.top_k)
  mean = np.asarray(cfg.model.pixel_mean, np.float32)
  out_dir = _OUT.value
  os.makedirs(out_dir, exist_ok=True)
  annotations = []
  for path, image, name, image_id in zip(paths, images, names, image_io.image_ids(names)):
    if os.path.dirname(name):
      os.makedirs(os.path.join(out_dir, os.path.dirname(name)), exist_ok=True)
    resized, (pad_h, pad_w) = prepare_input(image, cfg.data)
    padded = np.broadcast_to(mean, (1, pad_h, pad_w, 3)).copy()
    padded[0, :resized.shape[0], :resized.shape[1]] = resized
    out = jax.device_get(predict(variables, jnp.asarray(padded)))
    result = post(out["class_logits"][0], out["mask_logits"][0], (pad_h, pad_w), resized.shape[:2],
                  image.shape[:2])
    written = []
    if "panoptic" in result:
      segment_map, segments = result["panoptic"]
      os.makedirs(os.path.dirname(os.path.join(out_dir, "panoptic", name)), exist_ok=True)
      panoptic_format.write_id_png(os.path.join(out_dir, "panoptic", name + ".png"), segment_map)
      annotations.append(panoptic_format.annotation(image_id, name + ".png", segments,
                                                    info.category_ids))
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
    categories = [dict(id=i, name=n, isthing=int(t))
                  for i, n, t in zip(info.category_ids, info.class_names, info.is_thing)]
    json_path = panoptic_format.write_predictions(os.path.join(out_dir, "panoptic"), annotations,
                                                  categories)
    print(f"COCO panoptic results: {json_path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=command_line.parse_flags)
