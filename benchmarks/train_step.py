"""Our jitted train step vs transformers' PyTorch train step, same weights and batch.

  python benchmarks/train_step.py            # Swin-T Mask2Former (COCO panoptic), 384x384, batch 2
  python benchmarks/train_step.py --small    # a small Swin model at 128x128, for a quick run
  python benchmarks/train_step.py --platform gpu --image_size 1024 [--dtype bfloat16]
      # on one GPU: JAX on CUDA, PyTorch on cuda:0 (bfloat16: our cfg.model.dtype, torch.autocast)

Each measurement runs in its own subprocess so its peak resident memory (ru_maxrss) is its own:
  convert  builds the torch model (seeded) and writes its weights converted to Flax variables
  jax    our train step (m2f_jax.training.step, one CPU device) from those variables
  torch  Mask2FormerForUniversalSegmentation(pixel_values, mask_labels, class_labels).loss
         .backward() + AdamW step
  jax_huge, torch_huge  the same two with malloc's transparent huge pages on
         (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which train.py sets with M2F_HUGE_PAGES=1 through
         m2f_jax.host_memory; both frameworks gain from them)
  jax_arena, torch_arena  the same two with freed memory kept in the process instead (mallopt:
         one arena, no mmap'd blocks, no trimming)
  jax_huge_kept, torch_huge_kept  huge pages and freed memory kept (no mmap'd blocks, no
         trimming, glibc's arenas): PyTorch's fastest setting on a 2-core CPU. It cannot help
         our step: XLA:CPU allocates the step's temporaries (2.7 GB for Swin-T) on a worker
         thread, and glibc maps a block that large afresh (and unmaps it on free) outside the
         main arena whatever the settings
  loss   the criterion alone (forward + gradient w.r.t. the predictions): point-sampled with
         cfg.loss.num_points vs as many uniform points as the image has pixels (the loss on
         full-resolution masks); XLA's compiled temp memory, and the peak RSS of running it when
         that fits in --max_loss_gb
Both frameworks return the memory freed during setup to the kernel before the steps
(host_memory.release_freed_memory; for our step through step.compile_step, as train.py does).
Seconds per step are the median of --steps timed steps after --warmup untimed ones. On a GPU the
malloc rows are left out and memory is each framework's peak device memory (JAX's allocator
statistics, torch.cuda.max_memory_allocated) instead of the process's peak RSS.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from m2f_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

_MALLOPT_VARIABLE = "M2F_BENCHMARK_MALLOPT"  # 'arena', 'kept' or unset
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def _keep_freed_memory(one_arena: bool) -> None:
  """glibc mallopt: no mmap'd blocks, no trimming; with `one_arena`, one arena for all threads."""
  import ctypes  # pylint: disable=g-import-not-at-top
  mallopt = ctypes.CDLL("libc.so.6").mallopt
  settings = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)]
  if one_arena:
    settings.append((_M_ARENA_MAX, 1))
  if not all(mallopt(parameter, value) == 1 for parameter, value in settings):
    raise RuntimeError(f"mallopt refused the settings {settings}")


# before numpy, torch or jax start threads:
if os.environ.get(_MALLOPT_VARIABLE) in ("arena", "kept"):
  _keep_freed_memory(one_arena=os.environ[_MALLOPT_VARIABLE] == "arena")
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_config(small: bool, max_targets: int = 100, image_size: int = 0, batch_size: int = 2,
                dtype: str = "float32"):
  """The benchmarked recipe: COCO panoptic Swin-T at 384x384, or a small Swin variant at 128x128
  with --small; `image_size` > 0 sets another square size."""
  from configs import base  # pylint: disable=g-import-not-at-top
  cfg = base.get_base_config()
  cfg.model.backbone = base.swin_backbone("tiny")
  cfg.data.image_size = (384, 384)
  cfg.batch_size = batch_size
  cfg.data.max_targets = max_targets
  cfg.model.dtype = dtype
  if small:
    cfg.model.backbone.update(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                              window_size=4)
    cfg.model.num_classes = 10
    cfg.model.pixel_decoder.update(conv_dim=64, mask_dim=64, num_layers=2, num_heads=4,
                                   ffn_dim=128, num_groups=32)
    cfg.model.decoder.update(num_queries=20, hidden_dim=64, num_heads=4, ffn_dim=128, num_layers=3)
    cfg.loss.num_points = 1024
    cfg.data.image_size = (128, 128)
  if image_size:
    cfg.data.image_size = (image_size, image_size)
  return cfg


def make_batch(cfg, num_targets: int = 5, seed: int = 0) -> dict:
  """Random images and `num_targets` rectangular segments per image (batch contract)."""
  rng = np.random.default_rng(seed)
  b, (h, w) = cfg.batch_size, cfg.data.image_size
  labels = np.full((b, cfg.data.max_targets), -1, np.int32)
  segments = np.zeros((b, 1, h, w), np.int32)
  for i in range(b):
    for t in range(num_targets):
      labels[i, t] = rng.integers(0, cfg.model.num_classes)
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      segments[i, 0, y:y + h // 3, x:x + w // 3] = t + 1
  return {"image": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
          "valid_hw": np.tile(np.int32([h, w]), (b, 1)), "labels": labels,
          "segment_ids": segments}


def normalised(images: np.ndarray, cfg) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 normalised with cfg.model's mean and std."""
  return (images - np.float32(cfg.model.pixel_mean)) / np.float32(cfg.model.pixel_std)


def torch_model(cfg):
  """transformers' model for `cfg` with seeded random weights, in train mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from m2f_jax.convert import hf  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.Mask2FormerConfig(**hf.hf_config_from_cfg(cfg))
  config.train_num_points = cfg.loss.num_points
  config.oversample_ratio = cfg.loss.oversample_ratio
  config.importance_sample_ratio = cfg.loss.importance_sample_ratio
  return transformers.Mask2FormerForUniversalSegmentation(config).train()


def median_seconds(run_step, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    run_step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_torch(cfg, platform: str, warmup: int, steps: int) -> dict:
  """transformers' train step on the CPU or cuda:0; bfloat16 through torch.autocast."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  device = torch.device("cuda" if platform == "gpu" else "cpu")
  model = torch_model(cfg).to(device)
  batch = make_batch(cfg)
  pixels = torch.from_numpy(normalised(batch["image"], cfg).transpose(0, 3, 1, 2).copy()).to(device)
  mask_labels, class_labels = [], []
  for labels, segments in zip(batch["labels"], batch["segment_ids"]):
    ids = np.flatnonzero(labels >= 0)
    mask_labels.append(torch.from_numpy(np.stack([(segments == i + 1).any(0) for i in ids])
                                        .astype(np.float32)).to(device))
    class_labels.append(torch.from_numpy(labels[ids].astype(np.int64)).to(device))
  opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.learning_rate,
                          weight_decay=cfg.optimizer.weight_decay)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=cfg.model.dtype == "bfloat16")

  def run_step():
    with autocast:
      loss = model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
      torch.cuda.synchronize()

  host_memory.release_freed_memory()
  result = {"seconds_per_step": median_seconds(run_step, warmup, steps)}
  if device.type == "cuda":
    result["peak_device_bytes"] = torch.cuda.max_memory_allocated()
  return result


def convert_weights(cfg, directory: str) -> dict:
  """Writes the torch model's weights as Flax variables (so the JAX process never loads torch)."""
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.convert import hf  # pylint: disable=g-import-not-at-top
  model_torch = torch_model(cfg)
  _, variables = hf.from_hf(model_torch.config.to_dict(), model_torch.state_dict())
  variables_io.save_variables(directory, variables)
  return {}


def bench_jax(cfg, variables_dir: str, warmup: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  variables = variables_io.load_variables(variables_dir)
  mesh = parallel.make_mesh()
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  state = state_lib.place_train_state(variables, tx, parallel.replicated(mesh))
  train_step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx, schedule,
                                        mesh, jax.random.key(0))
  batch = parallel.global_batch(make_batch(cfg), mesh)
  start = time.perf_counter()
  compiled = step_lib.compile_step(train_step, state, batch)
  compile_seconds = time.perf_counter() - start
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  return {"seconds_per_step": median_seconds(run_step, warmup, steps),
          "compile_seconds": compile_seconds, **_jax_peak_device_bytes()}


def _jax_peak_device_bytes() -> dict:
  """{'peak_device_bytes': n} from the first device's allocator, where it keeps statistics (GPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"peak_device_bytes": stats["peak_bytes_in_use"]} if "peak_bytes_in_use" in stats else {}


def bench_loss(cfg, full_resolution: bool, max_gb: float) -> dict:
  """Temp memory of the compiled criterion + gradient; runs it when that is below `max_gb`."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  h, w = cfg.data.image_size
  if full_resolution:
    cfg.loss.update(num_points=h * w, oversample_ratio=1.0, importance_sample_ratio=0.0)
  layers, q = cfg.model.decoder.num_layers + 1, cfg.model.decoder.num_queries
  rng = np.random.default_rng(0)
  outputs = {
      "class_logits": rng.standard_normal((layers, cfg.batch_size, q, cfg.model.num_classes + 1),
                                          np.float32),
      "mask_logits": rng.standard_normal((layers, cfg.batch_size, q, h // 4, w // 4), np.float32)}
  batch = make_batch(cfg)
  loss_fn = step_lib.default_loss_fn(cfg, parallel.make_mesh())
  grad = jax.jit(jax.grad(lambda o, b, k: loss_fn(o, b, k)[0]))
  compiled = grad.lower(outputs, batch, jax.random.key(0)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  host_memory.release_freed_memory()
  ran = temp < max_gb * (1 << 30)
  if ran:
    jax.block_until_ready(compiled(outputs, batch, jax.random.key(0)))
  return {"temp_bytes": int(temp), "points": int(cfg.loss.num_points), "ran": bool(ran),
          **_jax_peak_device_bytes()}


def _config(args):
  return make_config(args.small, args.max_targets, args.image_size, args.batch_size, args.dtype)


def _child(args) -> None:
  cfg = _config(args)
  if args.child == "convert":
    result = convert_weights(cfg, args.variables_dir)
  elif args.child.startswith("torch"):
    result = bench_torch(cfg, args.platform, args.warmup, args.steps)
  elif args.child.startswith("jax"):
    result = bench_jax(cfg, args.variables_dir, args.warmup, args.steps)
  else:
    result = bench_loss(cfg, args.child == "loss_full", args.max_loss_gb)
  result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, which: str, child_args: list, malloc: str = "",
              platform: str = "cpu") -> dict:
  """Runs `script --child which *child_args` in a subprocess; returns its RESULT dict.
  `malloc`: 'huge' (transparent huge pages, as train.py runs with M2F_HUGE_PAGES=1), 'arena' (one arena keeping freed
  memory), 'huge_kept' (huge pages, freed memory kept) or anything else for glibc's defaults.
  `platform`: JAX's, 'cpu' or 'gpu' (CUDA)."""
  cmd = [sys.executable, os.path.abspath(script), "--child", which] + child_args
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(JAX_PLATFORMS="cuda" if platform == "gpu" else "cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env[_MALLOPT_VARIABLE] = {"arena": "arena", "huge_kept": "kept"}.get(malloc, "")
  if malloc in ("huge", "huge_kept"):
    env = host_memory.environment_with_huge_pages(env)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{which} benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="small model at 128x128 (quick)")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                      help="where both frameworks run (gpu: the first CUDA device)")
  parser.add_argument("--image_size", type=int, default=0,
                      help="square image side (default 384, 128 with --small)")
  parser.add_argument("--batch_size", type=int, default=2, help="images per step")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype (parameters and losses stay float32)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  parser.add_argument("--max_loss_gb", type=float, default=8.0,
                      help="run the criterion only when its compiled temp memory is below this")
  parser.add_argument("--max_targets", type=int, default=100,
                      help="target slots per image (cfg.data.max_targets; 5 are real)")
  parser.add_argument("--child", choices=("convert", "jax", "jax_huge", "jax_arena",
                                          "jax_huge_kept", "torch", "torch_huge", "torch_arena",
                                          "torch_huge_kept", "loss_points", "loss_full"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--variables_dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  if args.image_size < 0 or args.image_size % 32 or args.batch_size < 1:
    parser.error("--image_size must be a multiple of 32 and --batch_size >= 1")
  if args.child:
    _child(args)
    return
  cfg = _config(args)
  gpu = args.platform == "gpu"
  malloc_rows = (("", "GPU, framework defaults"),) if gpu else (
      ("", "glibc defaults"), ("_huge", "huge pages (M2F_HUGE_PAGES=1)"),
      ("_arena", "one arena, freed memory kept"),
      ("_huge_kept", "huge pages, freed memory kept"))
  with tempfile.TemporaryDirectory() as tmp:
    args.variables_dir = os.path.join(tmp, "variables")
    child_args = ["--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--variables_dir", args.variables_dir, "--max_loss_gb", str(args.max_loss_gb),
                  "--max_targets", str(args.max_targets), "--platform", args.platform,
                  "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
                  "--dtype", args.dtype] + (["--small"] if args.small else [])
    results = {"convert": run_child(__file__, "convert", child_args)}
    for suffix, _ in malloc_rows:
      for framework in ("jax", "torch"):
        results[framework + suffix] = run_child(__file__, framework + suffix, child_args,
                                                malloc=suffix[1:], platform=args.platform)
    for name in ("loss_points", "loss_full"):
      results[name] = run_child(__file__, name, child_args, platform=args.platform)
  _print_tables(args, cfg, malloc_rows, results)


def _print_tables(args, cfg, malloc_rows, results: dict) -> None:
  gb = 1 << 30
  gpu = args.platform == "gpu"
  memory = "peak_device_bytes" if gpu else "peak_rss_bytes"
  memory_label = "peak device memory GB" if gpu else "peak RSS GB"
  h, w = cfg.data.image_size
  where = "GPU" if gpu else f"CPU ({os.cpu_count()} cores)"
  print(f"\nTrain step, {where}, {'small Swin' if args.small else 'Swin-T'} Mask2Former, {h}x{w}, "
        f"batch {cfg.batch_size}, {cfg.model.dtype}, {cfg.data.max_targets} target slots (5 real), "
        f"median of {args.steps} steps:")
  print(f"| {'run' if gpu else 'malloc'} | m2f_jax s/step | transformers s/step | PyTorch / JAX time "
        f"| m2f_jax {memory_label} | transformers {memory_label} |")
  print("|---|---|---|---|---|---|")
  for suffix, label in malloc_rows:
    ours, theirs = results["jax" + suffix], results["torch" + suffix]
    print(f"| {label} | {ours['seconds_per_step']:.3f} (compile {ours['compile_seconds']:.0f} s) | "
          f"{theirs['seconds_per_step']:.3f} | "
          f"{theirs['seconds_per_step'] / ours['seconds_per_step']:.2f} | "
          f"{ours[memory] / gb:.2f} | {theirs[memory] / gb:.2f} |")
  print(f"\nCriterion + gradient (compiled temp memory / {memory_label}):")
  print(f"| | points per mask | temp (GB) | {memory_label} |")
  print("|---|---|---|---|")
  for name, label in (("loss_points", "point-sampled"), ("loss_full", "full resolution")):
    r = results[name]
    peak = f"{r[memory] / gb:.2f}" if r["ran"] else f"not run (> {args.max_loss_gb} GB)"
    print(f"| {label} | {r['points']} | {r['temp_bytes'] / gb:.3f} | {peak} |")


if __name__ == "__main__":
  main()
