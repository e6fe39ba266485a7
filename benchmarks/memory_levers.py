"""Compiled memory of the train step under each memory lever (model.remat, grad_accum_steps).

  python benchmarks/memory_levers.py      # COCO panoptic R50 at 256x256, global batch 2, 1 device
  python benchmarks/memory_levers.py --image_size 1024 --settings none:1,all:1,none:2
      # SETTINGS: comma-separated REMAT:GRAD_ACCUM_STEPS, '+' joining stages (backbone+decoder:2)
  PYTHONPATH=/path/to/libtpu python benchmarks/memory_levers.py --topology v5e:2x2 --part model
      # one chip of a TPU topology (needs the libtpu package; no TPU), the model's gradient only

Lowers and compiles (never runs) the real train step (m2f_jax.training.step) for one device, for
abstract state and batch, once per setting, and prints XLA's memory analysis as a markdown table:
temporaries (activations and everything else the step allocates besides its arguments and
outputs) and arguments (train state + batch). `--part model` compiles the gradient of a fixed
projection of the model's outputs instead (no criterion, no optimizer; grad_accum_steps 1).

XLA:CPU cannot show what remat buys: it expands the optimization barriers of jax.checkpoint before
common-subexpression elimination, which then merges the recomputed forward pass back into the
original one (R50: 229 convolutions and 17 barriers in the lowered remat='backbone' program, 176
and none in the compiled one, as with remat='none'). Compile for a TPU topology (`--topology`) or
on a GPU to see it.
"""
import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = "none:1,all:1,backbone:1,pixel_decoder:1,decoder:1,none:2,all:2"


def load_config(path: str):
  """get_config() of a configs/*.py file."""
  spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def compiled_memory(cfg, remat: str, grad_accum_steps: int, device, part: str) -> dict:
  """Memory analysis of the train step (or the model's gradient) of `cfg` with these levers."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  cfg = cfg.copy_and_resolve_references()
  cfg.model.remat = remat
  mesh = parallel.Mesh(np.asarray([device]), (parallel.DATA_AXIS,))
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  init = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size))
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                       jax.eval_shape(init, jax.random.key(0)))
  b, (h, w) = cfg.batch_size, cfg.data.image_size
  shapes = {"image": ((b, h, w, 3), jnp.uint8), "valid_hw": ((b, 2), jnp.int32),
            "labels": ((b, cfg.data.max_targets), jnp.int32),
            "segment_ids": ((b, cfg.data.segment_layers, h, w), jnp.int32)}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharded) for k, (s, d) in shapes.items()}
  if part == "step":
    step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx, schedule,
                                    mesh, jax.random.key(0), grad_accum_steps=grad_accum_steps)
    lowered = step.lower(state, batch)
  else:
    def objective(params, images, batch_stats):
      outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                               train=True, mutable=["batch_stats"])
      return sum(jnp.sum(jnp.tanh(outputs[k])) for k in sorted(outputs))

    lowered = jax.jit(jax.grad(objective)).lower(state.params, batch["image"], state.batch_stats)
  start = time.perf_counter()
  analysis = lowered.compile().memory_analysis()
  return {"temp": analysis.temp_size_in_bytes, "arguments": analysis.argument_size_in_bytes,
          "compile_seconds": time.perf_counter() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco_panoptic_r50.py"))
  parser.add_argument("--image_size", type=int, default=256, help="square training crop")
  parser.add_argument("--batch_size", type=int, default=2, help="global batch (one device)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--settings", default=SETTINGS,
                      help="comma-separated REMAT:GRAD_ACCUM_STEPS (REMAT with '+' for several "
                           "stages, e.g. backbone+decoder:2)")
  parser.add_argument("--part", default="step", choices=("step", "model"),
                      help="the train step, or the model's gradient alone")
  parser.add_argument("--topology", default="",
                      help="compile for one chip of this TPU topology (e.g. v5e:2x2; needs libtpu)")
  args = parser.parse_args()
  if args.topology:  # before libtpu loads: no metadata server, one host, a second process may load
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  cfg = load_config(args.config)
  cfg.data.image_size = (args.image_size, args.image_size)
  cfg.batch_size = args.batch_size
  cfg.model.dtype = args.dtype
  from m2f_jax.tools import plan  # pylint: disable=g-import-not-at-top (after the environment)
  device = plan.topology_devices(args.topology or "cpu")[0]
  what = "train_step" if args.part == "step" else "grad(model)"
  print(f"{os.path.relpath(args.config, ROOT)}, {args.image_size}x{args.image_size}, batch "
        f"{args.batch_size} on one {device.device_kind}, {args.dtype}; MiB from "
        f"jit({what}).lower(...).compile().memory_analysis()\n")
  print("| model.remat | grad_accum_steps | temporaries MiB | x first row | arguments MiB | "
        "compile s |")
  print("|---|---|---|---|---|---|")
  baseline = None
  for setting in args.settings.split(","):
    remat, steps = setting.rsplit(":", 1)
    remat = remat.replace("+", ",")
    if args.part == "model" and int(steps) != 1:
      raise ValueError(f"--part model has no grad_accum_steps; got setting {setting!r}")
    result = compiled_memory(cfg, remat, int(steps), device, args.part)
    baseline = baseline or result["temp"]
    mib = lambda n: f"{n / 2**20:.1f}"
    print(f"| {remat} | {steps} | {mib(result['temp'])} | {result['temp'] / baseline:.2f} | "
          f"{mib(result['arguments'])} | {result['compile_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
