"""Converts a PyTorch Mask2Former checkpoint into an m2f_jax variables directory.

  python -m m2f_jax.tools.convert --from hf --src HF_DIR [--config configs/X.py] --out DIR
  python -m m2f_jax.tools.convert --from detectron2 --src model_final_94dc52.pkl \
      --config configs/coco_panoptic_r50.py --out DIR

hf: HF_DIR holds the Hub files config.json and model.safetensors (or sharded safetensors with
model.safetensors.index.json); the model section comes from config.json, the rest from --config
(configs/base.py's defaults without it). detectron2: the authors' pickle plus the config of its
recipe. DIR receives the variables and the config (m2f_jax.variables_io).
"""
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from m2f_jax import variables_io
from m2f_jax.convert.detectron2 import from_detectron2
from m2f_jax.convert.hf import from_hf, load_hf_directory

SOURCES = ("hf", "detectron2")

flags.DEFINE_enum("from", None, SOURCES, "checkpoint format")
flags.DEFINE_string("src", None, "hf: directory with config.json + model.safetensors; detectron2: the .pkl")
flags.DEFINE_string("out", None, "output directory (must not hold variables yet)")
_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe config (required for detectron2)",
                                          lock_config=False)


def convert(source: str, src: str, out: str,
            cfg: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """Converts `src` and writes variables + config under `out`; returns the written config."""
  if source == "hf":
    hf_config, state_dict = load_hf_directory(src)
    hf_cfg, variables = from_hf(hf_config, state_dict)
    if cfg is not None:
      cfg = ml_collections.ConfigDict(cfg.to_dict())
      cfg.model = hf_cfg.model
    else:
      cfg = hf_cfg
  elif source == "detectron2":
    if cfg is None:
      raise ValueError("--from detectron2 needs --config naming the checkpoint's recipe "
                       "(e.g. configs/coco_panoptic_r50.py)")
    variables = from_detectron2(src, cfg)
  else:
    raise ValueError(f"--from must be one of {SOURCES}, got {source!r}")
  variables_io.save_variables(out, variables, cfg)
  return cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("from", "src", "out"):
    if flags.FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:
    convert(flags.FLAGS["from"].value, flags.FLAGS.src, flags.FLAGS.out, _CONFIG.value)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {os.path.abspath(flags.FLAGS.out)}")


if __name__ == "__main__":
  app.run(main)
