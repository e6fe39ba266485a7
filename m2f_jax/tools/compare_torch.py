"""Runs transformers' PyTorch Mask2Former and ours on the same weights and images, side by side.

  python -m m2f_jax.tools.compare_torch --config configs/coco_panoptic_r50.py [--hf-dir DIR] \
      [--size 384x384] [--batch 1] [--repeats 3]

Without --hf-dir the PyTorch model is built from the config with every weight randomised at a
fan-in scale (no zero-initialised parts left to hide mapping bugs); with it, the model is read
from a local Hub-format directory (config.json + model.safetensors) and --config is ignored.
Prints, for class and mask logits, the largest difference over all predictions (absolute and
relative to the logit scale), the smallest attention-mask margin (|resized logit|; values near 0
may flip between frameworks), and each side's time.
"""
import statistics
import time
from typing import Callable, Dict, Tuple

from absl import app
from absl import flags
import jax
import numpy as np
import torch
import transformers
from ml_collections import config_flags

from m2f_jax.convert.hf import from_hf, hf_config_from_cfg, load_hf_directory
from m2f_jax.models import build_model

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
LEVEL_STRIDES = (32, 16, 8)

_CONFIG = config_flags.DEFINE_config_file("config", None, "model config (configs/*.py)", lock_config=False)
flags.DEFINE_string("hf-dir", None, "local Hub-format Mask2Former directory (instead of random weights)")
flags.DEFINE_string("size", "384x384", "input HxW, multiples of 32")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("repeats", 3, "timed runs per framework after one warm-up run")
flags.DEFINE_integer("seed", 0, "seed of the weights and the images")


def randomise_scaled_(model: torch.nn.Module, seed: int) -> None:
  """Random weights at a fan-in scale, so activations stay O(1) at any width and depth."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if not tensor.is_floating_point() or name.startswith("criterion."):
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + noise.abs())
      elif tensor.ndim >= 2 and "embed" not in name and "relative_position_bias_table" not in name:
        tensor.copy_(noise / np.sqrt(tensor[0].numel()))  # fan-in of a Linear / conv weight
      elif tensor.ndim == 1 and name.endswith("weight"):  # norm scales
        tensor.copy_(1.0 + 0.1 * noise)
      else:  # biases, running means, embeddings, relative position tables
        tensor.copy_(0.1 * noise if tensor.ndim == 1 else noise)


def torch_model_and_config(cfg, hf_dir, seed):
  """(PyTorch model in eval mode, its state dict as numpy, its config dict)."""
  if hf_dir:
    hf_config, state_dict = load_hf_directory(hf_dir)
    model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(hf_dir).eval()
    return model, state_dict, hf_config
  if cfg is None:
    raise app.UsageError("give --config (random weights) or --hf-dir")
  torch.manual_seed(seed)
  hf_config = transformers.Mask2FormerConfig(**hf_config_from_cfg(cfg))
  model = transformers.Mask2FormerForUniversalSegmentation(hf_config).eval()
  randomise_scaled_(model, seed)
  state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model, state_dict, hf_config.to_dict()


def torch_forward(model, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """All predictions of transformers' model: class [L,B,Q,K+1], masks [L,B,Q,h,w]."""
  x = (images.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), output_auxiliary_logits=True)
  predictions = list(out.auxiliary_logits) + [
      {"class_queries_logits": out.class_queries_logits, "masks_queries_logits": out.masks_queries_logits}]
  return (np.stack([p["class_queries_logits"].numpy() for p in predictions]),
          np.stack([p["masks_queries_logits"].numpy() for p in predictions]))


def attention_mask_margin(masks: np.ndarray, image_hw: Tuple[int, int]) -> float:
  """Smallest |logit| of any attention mask (prediction i resized to layer i's level)."""
  margin = np.inf
  for i in range(masks.shape[0] - 1):
    level_hw = tuple(s // LEVEL_STRIDES[i % 3] for s in image_hw)
    resized = torch.nn.functional.interpolate(torch.from_numpy(masks[i]), size=level_hw,
                                              mode="bilinear", align_corners=False)
    margin = min(margin, resized.abs().min().item())
  return margin


def timed(fn: Callable[[], object], repeats: int) -> Tuple[float, float]:
  """(first call seconds, median of `repeats` later calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def compare(cfg, hf_dir: str, image_hw: Tuple[int, int], batch: int, repeats: int, seed: int) -> Dict:
  """Runs both frameworks; returns differences and timings."""
  torch_model, state_dict, hf_config = torch_model_and_config(cfg, hf_dir, seed)
  our_cfg, variables = from_hf(hf_config, state_dict)
  model = build_model(our_cfg)
  images = np.random.default_rng(seed).integers(0, 256, (batch,) + image_hw + (3,), dtype=np.uint8)

  apply = jax.jit(model.apply)
  start = time.perf_counter()
  compiled = apply.lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  ours = {}
  _, jax_s = timed(lambda: ours.update(jax.block_until_ready(compiled(variables, images))), repeats)
  results = {}
  _, torch_s = timed(lambda: results.update(zip(("class", "mask"), torch_forward(torch_model, images))),
                     repeats)
  report = {"compile_s": compile_s, "jax_s": jax_s, "torch_s": torch_s,
            "margin": attention_mask_margin(results["mask"], image_hw)}
  for name, key in (("class", "class_logits"), ("mask", "mask_logits")):
    difference = np.abs(np.asarray(ours[key]) - results[name])
    report[name] = (float(difference.max()), float(difference.max() / np.abs(results[name]).max()),
                    float(np.abs(difference[-1]).max() / np.abs(results[name][-1]).max()))
  return report


def parse_size(text: str) -> Tuple[int, int]:
  try:
    height, width = (int(v) for v in text.lower().split("x"))
  except ValueError as e:
    raise app.UsageError(f"--size must look like 384x384, got {text!r}") from e
  if height % 32 or width % 32 or height <= 0 or width <= 0:
    raise app.UsageError(f"--size must be positive multiples of 32, got {text}")
  return height, width


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  image_hw = parse_size(f.size)
  report = compare(_CONFIG.value, f["hf-dir"].value, image_hw, f.batch, f.repeats, f.seed)
  print(f"input {f.batch}x{image_hw[0]}x{image_hw[1]}")
  for name in ("class", "mask"):
    absolute, relative, final = report[name]
    print(f"{name}_logits: max |ours - torch| {absolute:.3e} over all predictions "
          f"({relative:.2e} of the logit scale; final prediction {final:.2e})")
  print(f"smallest attention-mask margin |logit| {report['margin']:.2e}")
  print(f"jax: compile {report['compile_s']:.2f} s, forward {report['jax_s'] * 1e3:.1f} ms (median)")
  print(f"torch: forward {report['torch_s'] * 1e3:.1f} ms (median)")


if __name__ == "__main__":
  app.run(main)
