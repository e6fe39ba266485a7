"""Two config variants of our train step, timed against each other inside one process.

  python benchmarks/step_ab.py --a loss.slots_per_pass=8 --b loss.slots_per_pass=1
  python benchmarks/step_ab.py --a loss.slots_per_pass=8 --b loss.slots_per_pass=1 --targets 11

On a busy or virtualised machine one version's step time moves by +-10% from process to process,
more than most changes are worth, so separate benchmark runs cannot rank two versions. Here both
variants of `train_step.py`'s JAX step (same model, batch and initial parameters; each `--a` /
`--b` is a dotted config key = Python literal) are compiled in this process and run alternately
(A B, B A, A B, ...) on the same batch; the first round is untimed. Prints each variant's median
seconds per step and the paired differences B - A (median, mean, standard deviation). Runs with
malloc's huge pages (as train.py does with M2F_HUGE_PAGES=1).
"""
import argparse
import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from m2f_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

os.environ.setdefault(host_memory.ENABLE_VARIABLE, "1")
host_memory.relaunch_with_huge_pages()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_overrides(items: list) -> dict:
  """['loss.slots_per_pass=1', ...] -> {'loss.slots_per_pass': 1, ...} (values as Python literals,
  else strings)."""
  overrides = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"expected key=value, got {item!r}")
    try:
      overrides[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[key] = text
  return overrides


def variant_config(base, overrides: dict):
  """A copy of `base` with the dotted-key overrides; an unknown key raises KeyError."""
  cfg = base.copy_and_resolve_references()
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(f"no config key {key!r}")
    node[leaf] = value
  return cfg


def compiled_step(cfg, batch, mesh):
  """(compiled step, initial state) for `cfg`; parameters from the same key for every variant."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import optimizer  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  model = build_model(cfg)
  tx, schedule = optimizer.build_optimizer(cfg)
  state = state_lib.train_state_initializer(model, tx, tuple(cfg.data.image_size),
                                            parallel.replicated(mesh))(jax.random.key(0))
  step = step_lib.make_train_step(model, step_lib.default_loss_fn(cfg, mesh), tx, schedule, mesh,
                                  jax.random.key(0))
  return step_lib.compile_step(step, state, batch), state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--a", nargs="+", default=[], help="overrides of variant A: key=value ...")
  parser.add_argument("--b", nargs="+", default=[], help="overrides of variant B: key=value ...")
  parser.add_argument("--rounds", type=int, default=9,
                      help="rounds of one step per variant (the first untimed)")
  parser.add_argument("--targets", type=int, default=5, help="real targets per image")
  parser.add_argument("--small", action="store_true", help="train_step.py's small model")
  args = parser.parse_args()
  if args.rounds < 2:
    parser.error("--rounds must be >= 2")
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  base = train_step.make_config(args.small)
  if not 1 <= args.targets <= base.data.max_targets:
    parser.error(f"--targets must be in [1, {base.data.max_targets}]")
  try:
    configs = {name: variant_config(base, parse_overrides(items))
               for name, items in (("A", args.a), ("B", args.b))}
  except (KeyError, TypeError, ValueError) as error:
    parser.error(str(error))
  mesh = parallel.make_mesh()
  batch = parallel.global_batch(train_step.make_batch(base, args.targets), mesh)
  steps, states, times = {}, {}, {"A": [], "B": []}
  for name, cfg in configs.items():
    steps[name], states[name] = compiled_step(cfg, batch, mesh)
  for round_index in range(args.rounds):
    for name in ("AB" if round_index % 2 == 0 else "BA"):
      start = time.perf_counter()
      states[name], metrics = steps[name](states[name], batch)
      jax.block_until_ready(metrics["loss"])
      if round_index:
        times[name].append(time.perf_counter() - start)
  paired = np.array(times["B"]) - np.array(times["A"])
  print(f"A {' '.join(args.a) or '(base)'}: median {np.median(times['A']):.3f} s/step")
  print(f"B {' '.join(args.b) or '(base)'}: median {np.median(times['B']):.3f} s/step")
  print(f"B - A over {len(paired)} paired rounds: median {np.median(paired):+.3f} s, "
        f"mean {paired.mean():+.3f} s, sd {paired.std():.3f} s")


if __name__ == "__main__":
  main()
