"""Plans a run before renting the machine: compiles the train step and the evaluation forward ahead
of time for a TPU topology, on any machine (no TPU needed, only the libtpu package), and prints
what each program takes per chip.

  python -m m2f_jax.tools.plan --config configs/NAME.py --topology v5e:2x2 --per_chip_batch 2 \
      [--config.KEY=VALUE ...] [--eval_per_chip_batch N] [--hbm_gib G] [--json PATH]

The programs are the real ones: `make_train_step` with the Mask2Former criterion, the authors'
optimiser and the TrainState (abstract, from jax.eval_shape) on a training batch of
cfg.data.image_size, and the evaluation forward `make_predict_fn` at cfg.data.eval_pad_size. The
global batch is per_chip_batch x chips (cfg.batch_size is overridden); the evaluation takes
eval_per_chip_batch images per chip (default: cfg.eval.batch_size / chips, at least 1).

Per chip and program it prints arguments, outputs, aliased (donated) bytes, temporaries, generated
code, the compiler's peak memory against the chip's HBM, FLOPs and bytes accessed per step, and the
compile time. XLA's cost analysis counts the body of a while loop (scan, the Hungarian matcher)
once, so FLOPs and bytes accessed are lower bounds. Exits with status 1 when a program does not
fit: the compiler's RESOURCE_EXHAUSTED message, or a peak above the HBM. `--topology cpu` compiles
for this machine's CPU devices (HBM unknown unless --hbm_gib is given). docs/plan.md has examples.
"""
import os

# libtpu reads these when it loads: no metadata server query (this need not be a TPU VM), one
# host (without it libtpu logs an INVALID_ARGUMENT error about worker hostnames), and a second
# process may load it while another holds its lock file.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# pylint: disable=wrong-import-position

import json
import math
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh
from ml_collections import config_flags
import ml_collections
import numpy as np

from m2f_jax import command_line
from m2f_jax import parallel
from m2f_jax import quiet_logs
from m2f_jax.evaluation import loop as eval_loop
from m2f_jax.models import build_model
from m2f_jax.training import optimizer
from m2f_jax.training import state as state_lib
from m2f_jax.training import step as step_lib

GIB = 2**30
# HBM per chip (one JAX device per chip: v4 in megacore mode).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_TOPOLOGY_RE = re.compile(r"^(?:(v4|v5p):\d+x\d+x\d+|(v5e|v6e):\d+x\d+)$")
TOPOLOGY_FORMS = ("cpu (this machine's CPU devices), v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB "
                  "(chips per axis, e.g. v5e:2x2, v5p:2x2x1, v5p:4x4x4)")
LOWER_BOUND_NOTE = ("XLA counts the body of each while loop (scan, the Hungarian matcher) once: "
                    "FLOPs and bytes accessed are lower bounds")
PROGRAMS = ("train", "eval")


def chip_family(topology: str) -> Optional[str]:
  """'v4', 'v5e', 'v5p', 'v6e', or None for 'cpu'; a ValueError listing the accepted forms else."""
  if topology == "cpu":
    return None
  match = _TOPOLOGY_RE.match(topology or "")
  if not match:
    raise ValueError(f"--topology={topology!r} is not a topology; give {TOPOLOGY_FORMS}")
  return match.group(1) or match.group(2)


def topology_devices(topology: str) -> list:
  """The devices to compile for: compile-only TPU devices of the topology (one per chip), or this
  machine's CPU devices for 'cpu'."""
  family = chip_family(topology)
  if family is None:
    return jax.devices("cpu")
  kwargs = {"chip_config_name": "megacore"} if family == "v4" else {}
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices)
  except RuntimeError as e:  # JaxRuntimeError too: a shape the chip does not come in
    if "not installed" in str(e):
      raise ValueError("TPU topologies need the libtpu package: pip install -r "
                       "requirements-tpu.txt (or the package's 'tpu' extra)") from e
    raise ValueError(f"--topology={topology!r}: {str(e).splitlines()[0]}; give "
                     f"{TOPOLOGY_FORMS}") from e


def _abstract(tree: Any, sharding: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _lower_train_step(cfg: ml_collections.ConfigDict, model: Any, mesh: Mesh, tx: Any,
                      schedule: Callable, state: state_lib.TrainState):
  """train.py's step lowered for the abstract `state` and a batch of cfg.batch_size images."""
  step_key = jax.random.split(jax.random.key(cfg.seed))[1]  # as loop.train draws it
  train_step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx, schedule,
                                        mesh, step_key,
                                        grad_accum_steps=cfg.get("grad_accum_steps", 1))
  b, (h, w), d = cfg.batch_size, tuple(cfg.data.image_size), cfg.data
  batch = {"image": ((b, h, w, 3), jnp.uint8), "valid_hw": ((b, 2), jnp.int32),
           "labels": ((b, d.max_targets), jnp.int32),
           "segment_ids": ((b, d.segment_layers, h, w), jnp.int32)}
  sharded = parallel.data_sharded(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)
           for k, (shape, dtype) in batch.items()}
  return train_step.lower(state, batch)


def _lower_eval_forward(model: Any, mesh: Mesh, variables: Any, batch: int, pad_hw: tuple):
  """eval.py's forward lowered for `batch` padded images [batch, *pad_hw, 3]."""
  sharded = parallel.data_sharded(mesh)
  images = jax.ShapeDtypeStruct((batch, *pad_hw, 3), jnp.uint8, sharding=sharded)
  valid_hw = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=sharded)
  return eval_loop.make_predict_fn(model, mesh).lower(variables, images, valid_hw)


def _cost(compiled: Any) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # one dict per partition in some jax versions
    cost = cost[0] if cost else {}
  return cost or {}


def measure(lowered: Any, platform: str, hbm_bytes: Optional[int]) -> tuple[Any, dict]:
  """Compiles `lowered` for `platform` ('tpu', 'cpu'); returns (compiled or None, per-chip numbers).
  A compile that runs out of memory gives None and the compiler's message under 'error'."""
  started = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, {"compile_seconds": time.perf_counter() - started, "fits": False,
                  "error": str(e).strip()}
  seconds = time.perf_counter() - started
  memory, cost = compiled.memory_analysis(), _cost(compiled)
  numbers = {
      "compile_seconds": seconds,
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "generated_code_bytes": int(memory.generated_code_size_in_bytes),
      "peak_bytes": int(memory.peak_memory_in_bytes),
      "peak_source": "compiler",
      "flops": float(cost.get("flops", 0.0)),
      "transcendentals": float(cost.get("transcendentals", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
  }
  if platform == "cpu":  # XLA:CPU's peak counts arguments and outputs, not temporaries
    numbers["peak_bytes"] = (numbers["argument_bytes"] + numbers["output_bytes"]
                             - numbers["alias_bytes"] + numbers["temp_bytes"])
    numbers["peak_source"] = "arguments + outputs - aliased + temporaries"
  numbers["fits"] = None if hbm_bytes is None else numbers["peak_bytes"] <= hbm_bytes
  numbers["error"] = None
  return compiled, numbers


def plan(cfg: ml_collections.ConfigDict, topology: str, per_chip_batch: int,
         eval_per_chip_batch: Optional[int] = None, hbm_gib: Optional[float] = None,
         programs: Sequence[str] = PROGRAMS,
         log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """Compiles the programs of `cfg` for `topology`.

  Returns:
    (report, compiled): the report (JSON-ready: topology, chips, hbm_bytes and per program
    'train' / 'eval' the numbers of `measure` with the batch and image size), and the compiled
    programs by name (None where the compiler ran out of memory).
  """
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown or not programs:
    raise ValueError(f"--programs={','.join(programs)}: give one or more of {', '.join(PROGRAMS)}")
  for name, value in (("per_chip_batch", per_chip_batch),
                      ("eval_per_chip_batch", eval_per_chip_batch)):
    if value is not None and value < 1:
      raise ValueError(f"--{name} must be a positive integer, got {value}")
  if hbm_gib is not None and hbm_gib <= 0:
    raise ValueError(f"--hbm_gib must be positive, got {hbm_gib}")
  family = chip_family(topology)
  devices = topology_devices(topology)
  chips = len(devices)
  if hbm_gib is None and family is not None:
    hbm_gib = HBM_GIB[family]
  hbm_bytes = None if hbm_gib is None else int(hbm_gib * GIB)
  cfg = cfg.copy_and_resolve_references()
  cfg.batch_size = per_chip_batch * chips
  if eval_per_chip_batch is None:
    eval_per_chip_batch = max(1, math.ceil(cfg.eval.batch_size / chips))
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  state = jax.eval_shape(lambda key: state_lib.create_train_state(
      state_lib.init_variables(model, key, tuple(cfg.data.image_size)), tx), jax.random.key(0))
  state = _abstract(state, parallel.replicated(mesh))
  platform = devices[0].platform
  report = {"topology": topology, "platform": platform,
            "device_kind": devices[0].device_kind, "chips": chips, "hbm_bytes": hbm_bytes,
            "dtype": cfg.model.dtype, "num_params": state_lib.num_params(state.params),
            "note": LOWER_BOUND_NOTE}
  compiled = {}
  where = f"{chips} {devices[0].device_kind} devices ({topology})"
  if "train" in programs:
    log(f"compiling the train step for {where}: {per_chip_batch} images of "
        f"{'x'.join(map(str, cfg.data.image_size))} per chip ...")
    lowered = _lower_train_step(cfg, model, mesh, tx, schedule, state)
    compiled["train"], numbers = measure(lowered, platform, hbm_bytes)
    report["train"] = {"per_chip_batch": per_chip_batch, "global_batch": cfg.batch_size,
                       "image_hw": list(cfg.data.image_size), **numbers}
  if "eval" in programs:
    pad_hw = tuple(int(v) for v in cfg.data.eval_pad_size)
    log(f"compiling the evaluation forward for {where}: {eval_per_chip_batch} images of "
        f"{'x'.join(map(str, pad_hw))} per chip ...")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    lowered = _lower_eval_forward(model, mesh, variables, eval_per_chip_batch * chips, pad_hw)
    compiled["eval"], numbers = measure(lowered, platform, hbm_bytes)
    report["eval"] = {"per_chip_batch": eval_per_chip_batch,
                      "global_batch": eval_per_chip_batch * chips, "image_hw": list(pad_hw),
                      **numbers}
  return report, compiled


def _size(num_bytes: float) -> str:
  if num_bytes >= GIB / 10:
    return f"{num_bytes / GIB:.2f} GiB"
  return f"{num_bytes / 2**20:.2f} MiB"


def _count(value: float, unit: str) -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
    if value >= scale:
      return f"{value / scale:.3f} {prefix}{unit}"
  return f"{value:.0f} {unit}"


def format_report(report: dict) -> str:
  """The report as the lines the tool prints."""
  hbm = report["hbm_bytes"]
  lines = [f"{report['chips']} x {report['device_kind']} ({report['topology']}), HBM per chip: "
           f"{_size(hbm) if hbm is not None else 'unknown (give --hbm_gib)'}; "
           f"{report['num_params']:,} parameters, compute dtype {report['dtype']}"]
  titles = {"train": "train step", "eval": "evaluation forward"}
  for name in PROGRAMS:
    if name not in report:
      continue
    p = report[name]
    lines.append(f"{titles[name]}: {p['per_chip_batch']} images of "
                 f"{'x'.join(map(str, p['image_hw']))} per chip (global batch "
                 f"{p['global_batch']}); compiled in {p['compile_seconds']:.1f} s")
    if p["error"] is not None:
      lines.append(f"  DOES NOT FIT: the compiler ran out of memory:\n  {p['error']}")
      continue
    peak = _size(p["peak_bytes"])
    if hbm is not None:
      peak += f" of {_size(hbm)} ({100 * p['peak_bytes'] / hbm:.0f}%)"
      peak += "" if p["fits"] else "  DOES NOT FIT"
    rows = [("arguments", _size(p["argument_bytes"])),
            ("outputs", _size(p["output_bytes"])),
            ("aliased", _size(p["alias_bytes"]) + " (outputs in donated arguments' buffers)"),
            ("temporaries", _size(p["temp_bytes"])),
            ("generated code", _size(p["generated_code_bytes"])),
            ("peak memory", peak + (" (the compiler's estimate)" if p["peak_source"] == "compiler"
                                    else f" ({p['peak_source']})")),
            ("FLOPs", _count(p["flops"], "FLOP") + " per step (lower bound)"),
            ("bytes accessed", _count(p["bytes_accessed"], "B") + " per step (lower bound)")]
    lines += [f"  {label:<15} {value}" for label, value in rows]
  lines.append(f"per chip; {report['note']}.")
  return "\n".join(lines)


def failures(report: dict) -> list[str]:
  """One line per program that does not fit (empty when all fit or the HBM is unknown)."""
  out = []
  for name in PROGRAMS:
    p = report.get(name)
    if p is None or p["fits"] is not False:
      continue
    if p["error"] is not None:
      out.append(f"the {name} program does not fit {report['topology']}: the compiler ran out of "
                 f"memory ({p['error'].splitlines()[0]})")
    else:
      out.append(f"the {name} program does not fit {report['topology']}: its peak "
                 f"{_size(p['peak_bytes'])} per chip exceeds the {_size(report['hbm_bytes'])} "
                 "of HBM")
  return out


def define_flags() -> None:
  """The command line's flags. Defined when the tool runs as a program, not on import: the planner's
  functions are used beside other tools whose absl flags share names (--config)."""
  config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/synthetic.py.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, f"Target: {TOPOLOGY_FORMS}.")
  flags.DEFINE_integer("per_chip_batch", 2, "Training images per chip; the global batch is this "
                       "times the chips (overrides cfg.batch_size).")
  flags.DEFINE_integer("eval_per_chip_batch", None, "Evaluation images per chip (default: "
                       "cfg.eval.batch_size / chips, rounded up, at least 1).")
  flags.DEFINE_float("hbm_gib", None, "Memory per chip in GiB (default: the chip's HBM: "
                     + ", ".join(f"{k} {v}" for k, v in HBM_GIB.items()) + ").")
  flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Programs to compile: train, eval.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    quiet_logs.quiet_third_party_logs()
  jax.config.update("jax_platforms", "cpu")  # TPU programs only compile here; nothing runs
  args = flags.FLAGS
  cfg = args.config
  try:
    chip_family(args.topology)  # before the config's data checks
    if cfg.data.name == "custom":  # its class count comes from the data set's files
      from m2f_jax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: only here)
      data.resolve_num_classes(cfg)
    report, _ = plan(cfg, args.topology, args.per_chip_batch, args.eval_per_chip_batch,
                     args.hbm_gib, tuple(args.programs), log=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a custom data set's files
    sys.exit(f"error: {e}")
  report["argv"] = sys.argv[1:]
  print(format_report(report), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  problems = failures(report)
  if problems:
    sys.exit("error: " + "\nerror: ".join(problems))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command_line.parse_flags)
