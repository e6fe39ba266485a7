"""Compiled memory of the pixel decoder's gradient alone, and XLA's largest allocations.

  PYTHONPATH=/path/to/libtpu python benchmarks/pixel_decoder_memory.py --topology v5p:2x2x1
  PYTHONPATH=/path/to/libtpu python benchmarks/pixel_decoder_memory.py --dtype bfloat16 --top 20

Lowers and compiles (never runs) the gradient of a fixed projection of `PixelDecoder`'s outputs
(R50 widths: res2..res5 of 256..2048 channels, bfloat16 as the backbone hands them over) with
respect to its parameters and inputs, for one chip of the topology (or this machine's CPU), and
prints the compiled temporaries and the largest allocations of XLA's buffer assignment (its
memory-usage report, dumped to a temporary directory): the shapes that take the memory, and how
much TPU tiles pad them. docs/memory_levers.md ("Where the bytes live") was found this way.
"""
import argparse
import glob
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHANNELS = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1", help="a TPU topology or 'cpu'")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--image_size", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--top", type=int, default=10, help="largest allocations to print")
  args = parser.parse_args()
  dump = tempfile.mkdtemp(prefix="pixel_decoder_dump_")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*objective.*")

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from m2f_jax.models.pixel_decoder import PixelDecoder  # pylint: disable=g-import-not-at-top
  from m2f_jax.tools import plan  # pylint: disable=g-import-not-at-top

  device = plan.topology_devices(args.topology)[:1]
  replicated = NamedSharding(Mesh(np.asarray(device), ("data",)), PartitionSpec())
  features = {name: jax.ShapeDtypeStruct(
      (args.batch_size, args.image_size // STRIDES[name], args.image_size // STRIDES[name],
       channels), jnp.bfloat16, sharding=replicated) for name, channels in CHANNELS.items()}
  module = PixelDecoder(dtype=jnp.dtype(args.dtype))
  params = jax.eval_shape(module.init, jax.random.key(0), features)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        params)

  def objective(params, features):
    def projection(p, x):
      mask_features, multi_scale = module.apply(p, x)
      return sum(jnp.sum(jnp.tanh(m.astype(jnp.float32))) for m in [mask_features] + multi_scale)
    return jax.grad(projection, argnums=(0, 1))(params, features)

  compiled = jax.jit(objective).lower(params, features).compile()
  print(f"{args.topology} ({device[0].device_kind}), PixelDecoder {args.dtype}, "
        f"{args.batch_size} x {args.image_size}x{args.image_size}: temporaries "
        f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.3f} GiB")
  reports = glob.glob(os.path.join(dump, "*memory-usage-report.txt"))
  if reports:
    print("\n".join(open(reports[0]).read().splitlines()[:4 + args.top]))


if __name__ == "__main__":
  main()
