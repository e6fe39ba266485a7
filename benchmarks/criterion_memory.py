"""Compiled memory of the criterion's loss and gradient: packed (criterion.py) against the plain
reference (reference_criterion.py), at a recipe's shapes.

  python benchmarks/criterion_memory.py                      # COCO R50 recipe, this machine's CPU
  PYTHONPATH=/path/to/libtpu python benchmarks/criterion_memory.py --topology v5p:2x2x1
      # per chip of a TPU topology (needs the libtpu package; no TPU)

Lowers and compiles (never runs) jit(value_and_grad) of each criterion with respect to the
decoder's outputs (class logits [L, B, Q, K+1], mask logits [L, B, Q, H/4, W/4]), the batch sharded
over the topology's chips, and prints a markdown table per chip: temporaries, peak, and FLOPs
(XLA counts a loop body once: the packed criterion's passes and the matcher are loops, so its
FLOPs are a lower bound and are not comparable with the reference's).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_levers import load_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "coco_panoptic_r50.py"))
  parser.add_argument("--topology", default="cpu")
  parser.add_argument("--per_chip_batch", type=int, default=2)
  parser.add_argument("--image_size", type=int, default=None,
                      help="square training size (default: the recipe's)")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax.losses import criterion  # pylint: disable=g-import-not-at-top
  from m2f_jax.losses import reference_criterion  # pylint: disable=g-import-not-at-top
  from m2f_jax.tools import plan  # pylint: disable=g-import-not-at-top

  cfg = load_config(args.config)
  devices = plan.topology_devices(args.topology)
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  height, width = ((args.image_size,) * 2 if args.image_size else tuple(cfg.data.image_size))
  batch_size = args.per_chip_batch * len(devices)
  layers, queries = cfg.model.decoder.num_layers + 1, cfg.model.decoder.num_queries
  sharded = parallel.data_sharded(mesh)
  by_layer = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  outputs = {
      "class_logits": jax.ShapeDtypeStruct((layers, batch_size, queries, cfg.model.num_classes + 1),
                                           jnp.float32, sharding=by_layer),
      "mask_logits": jax.ShapeDtypeStruct((layers, batch_size, queries, height // 4, width // 4),
                                          jnp.float32, sharding=by_layer)}
  batch = {"labels": jax.ShapeDtypeStruct((batch_size, cfg.data.max_targets), jnp.int32,
                                          sharding=sharded),
           "segment_ids": jax.ShapeDtypeStruct((batch_size, cfg.data.segment_layers, height, width),
                                               jnp.int32, sharding=sharded)}
  print(f"{args.topology} ({devices[0].device_kind}), {args.per_chip_batch} images of "
        f"{height}x{width} per chip, L={layers}, Q={queries}, M={cfg.data.max_targets}, "
        f"P={cfg.loss.num_points}\n")
  print("| criterion | temporaries GiB | peak GiB | GFLOP (lower bound for packed) |")
  print("|---|---|---|---|")
  for name, loss in (("packed", criterion.mask2former_loss),
                     ("reference", reference_criterion.reference_loss)):
    def value_and_grad(outputs, batch, loss=loss):
      return jax.value_and_grad(lambda o: loss(o, batch, jax.random.key(0), cfg.loss,
                                               cfg.model.num_classes, mesh=mesh)[0])(outputs)
    lowered = jax.jit(value_and_grad).lower(outputs, batch)
    _, numbers = plan.measure(lowered, devices[0].platform, None)
    if numbers["error"]:
      print(f"| {name} | does not fit: {numbers['error'].splitlines()[0][:120]} | | |")
      continue
    print(f"| {name} | {numbers['temp_bytes'] / 2**30:.2f} | {numbers['peak_bytes'] / 2**30:.2f} "
          f"| {numbers['flops'] / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
  main()
