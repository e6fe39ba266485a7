"""Forward-pass benchmark: m2f_jax against transformers' PyTorch Mask2Former on CPU.

  python benchmarks/forward.py [--configs coco_panoptic_swin_t,coco_panoptic_r50] \
      [--sizes 384x384,512x512] [--repeats 5]

For each config, one random PyTorch model (weights at a fan-in scale) is saved in Hub format;
both frameworks then load those same weights in their own subprocess (so each process's peak
RSS is its own) and run the same uint8 batch of 1. Reported: median wall time of `repeats` runs
after a warm-up run, JAX compile time apart, peak RSS per process, the time ratio, and the
largest output difference relative to the logit scale. Prints a markdown table.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script: make m2f_jax and configs importable
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def images_for(size, seed=0):
  height, width = size
  return np.random.default_rng(seed).integers(0, 256, (1, height, width, 3), dtype=np.uint8)


def timed_runs(fn, repeats):
  """Median seconds of `repeats` calls after one warm-up call, and the last result."""
  result = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def save_weights(config_name, hub_dir, seed):
  """Builds the random PyTorch model of a config and saves it in Hub format."""
  import importlib
  import transformers
  import torch
  from m2f_jax.convert.hf import hf_config_from_cfg
  from m2f_jax.tools.compare_torch import randomise_scaled_
  cfg = importlib.import_module(f"configs.{config_name}").get_config()
  torch.manual_seed(seed)
  model = transformers.Mask2FormerForUniversalSegmentation(
      transformers.Mask2FormerConfig(**hf_config_from_cfg(cfg))).eval()
  randomise_scaled_(model, seed)
  model.save_pretrained(hub_dir)


def run_torch(hub_dir, size, repeats, out_path):
  import torch
  import transformers
  model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(hub_dir).eval()
  x = (images_for(size).astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
  pixels = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def forward():
    with torch.no_grad():
      out = model(pixels, output_auxiliary_logits=True)
    classes = [a["class_queries_logits"] for a in out.auxiliary_logits] + [out.class_queries_logits]
    masks = [a["masks_queries_logits"] for a in out.auxiliary_logits] + [out.masks_queries_logits]
    return torch.stack(classes).numpy(), torch.stack(masks).numpy()

  seconds, (classes, masks) = timed_runs(forward, repeats)
  np.savez(out_path, class_logits=classes, mask_logits=masks)
  return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def run_jax(hub_dir, size, repeats, out_path):
  import jax
  from m2f_jax.convert.hf import from_hf, load_hf_directory
  from m2f_jax.models import build_model
  cfg, variables = from_hf(*load_hf_directory(hub_dir))
  variables = jax.device_put(variables)
  images = images_for(size)
  start = time.perf_counter()
  compiled = jax.jit(build_model(cfg).apply).lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  seconds, out = timed_runs(lambda: jax.block_until_ready(compiled(variables, images)), repeats)
  np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})
  return {"seconds": seconds, "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(),
          "device": str(jax.devices()[0])}


def worker(args):
  if args.framework == "save":
    save_weights(args.config, args.hub_dir, args.seed)
    print("RESULT {}")
    return
  size = tuple(int(v) for v in args.size.split("x"))
  run = {"jax": run_jax, "torch": run_torch}[args.framework]
  print("RESULT " + json.dumps(run(args.hub_dir, size, args.repeats, args.out)))


def subprocess_result(args_list):
  result = subprocess.run([sys.executable, os.path.abspath(__file__)] + args_list, cwd=REPO,
                          capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"benchmark worker {args_list} failed:\n{result.stderr[-4000:]}")
  line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def relative_difference(ours_path, torch_path):
  ours, theirs = np.load(ours_path), np.load(torch_path)
  return max(float(np.abs(ours[k] - theirs[k]).max() / np.abs(theirs[k]).max())
             for k in ("class_logits", "mask_logits"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="coco_panoptic_swin_t,coco_panoptic_r50")
  parser.add_argument("--sizes", default="384x384,512x512")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  # worker mode (one framework, one size, in its own process)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--framework", choices=("jax", "torch", "save"), help=argparse.SUPPRESS)
  parser.add_argument("--config", help=argparse.SUPPRESS)
  parser.add_argument("--hub-dir", help=argparse.SUPPRESS)
  parser.add_argument("--size", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for config_name in args.configs.split(","):
      hub_dir = os.path.join(tmp, config_name)
      subprocess_result(["--worker", "--framework", "save", "--config", config_name,
                         "--hub-dir", hub_dir, "--seed", str(args.seed)])
      for size in args.sizes.split(","):
        results = {}
        for framework in ("jax", "torch"):
          out = os.path.join(tmp, f"{config_name}_{size}_{framework}.npz")
          results[framework] = subprocess_result(
              ["--worker", "--framework", framework, "--hub-dir", hub_dir, "--size", size,
               "--repeats", str(args.repeats), "--out", out])
          results[framework]["out"] = out
        difference = relative_difference(results["jax"]["out"], results["torch"]["out"])
        rows.append((config_name, size, results["jax"], results["torch"], difference))

  print("| config | input | JAX ms | PyTorch ms | PyTorch / JAX | JAX compile s | JAX peak RSS MB "
        "| PyTorch peak RSS MB | max rel. diff |")
  print("|---|---|---|---|---|---|---|---|---|")
  for config_name, size, ours, theirs, difference in rows:
    print(f"| {config_name} | 1x{size} | {ours['seconds'] * 1e3:.0f} | {theirs['seconds'] * 1e3:.0f} "
          f"| {theirs['seconds'] / ours['seconds']:.2f} | {ours['compile_s']:.1f} "
          f"| {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | {difference:.1e} |")
  print(f"\nJAX device: {rows[0][2]['device']}; PyTorch threads: {rows[0][3]['threads']}")


if __name__ == "__main__":
  main()
