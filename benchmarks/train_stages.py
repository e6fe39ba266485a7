"""Where a train step's model time goes: each stage's forward and forward + backward, JAX vs PyTorch.

  python benchmarks/train_stages.py            # Swin-T Mask2Former (COCO panoptic), 384x384, batch 2
  python benchmarks/train_stages.py --small    # a small Swin model at 128x128, for a quick run

The stages of `train_step.py`'s model, one at a time on the same shapes: backbone, pixel decoder,
transformer decoder, in training mode, with 1e-6 * (sum of squares of the stage's outputs) as the
loss; the gradient is taken w.r.t. the stage's parameters and inputs. Each framework runs in its
own subprocess, with its own random weights (timing only), both with malloc's huge pages on
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as train.py runs with M2F_HUGE_PAGES=1). Seconds are the median of --repeats
timed runs after a warm-up run (JAX compiled apart). Prints a markdown table with ratios.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

STAGES = ("backbone", "pixel_decoder", "decoder")


def _images(cfg) -> np.ndarray:
  """Normalised float32 [B, H, W, 3] images of the benchmark batch."""
  return train_step.normalised(train_step.make_batch(cfg)["image"], cfg)


def bench_jax(cfg, repeats: int) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from m2f_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  model = build_model(cfg)
  variables = state_lib.init_variables(model, jax.random.key(0), tuple(cfg.data.image_size))
  rngs = {"dropout": jax.random.key(1)}

  def stage(call):
    return lambda v, inputs: nn.apply(call, model, mutable=["batch_stats"])(
        v, inputs, rngs=rngs)[0]

  stages = {
      "backbone": stage(lambda m, x: m.backbone(x, True)),
      "pixel_decoder": stage(lambda m, features: m.pixel_decoder(features)),
      "decoder": stage(lambda m, decoded: m.decoder(decoded[1], decoded[0])),
  }
  inputs = {"backbone": jnp.asarray(_images(cfg))}
  inputs["pixel_decoder"] = jax.jit(stages["backbone"])(variables, inputs["backbone"])
  inputs["decoder"] = jax.jit(stages["pixel_decoder"])(variables, inputs["pixel_decoder"])

  def squares(tree):
    return 1e-6 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))

  result = {}
  for name in STAGES:
    forward = jax.jit(stages[name])
    gradient = jax.jit(jax.grad(lambda v, x, f=stages[name]: squares(f(v, x)), argnums=(0, 1)))
    for kind, fn in (("forward", forward), ("forward_backward", gradient)):
      compiled = fn.lower(variables, inputs[name]).compile()
      result[f"{name}/{kind}"] = train_step.median_seconds(
          lambda c=compiled: jax.block_until_ready(c(variables, inputs[name])), 1, repeats)
  return result


def bench_torch(cfg, repeats: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  model = train_step.torch_model(cfg).model
  pixel_module = model.pixel_level_module
  stages = {
      "backbone": lambda x: pixel_module.encoder(x).feature_maps,
      "pixel_decoder": lambda features: (lambda out: [out.mask_features] + list(
          out.multi_scale_features))(pixel_module.decoder(features)),
      "decoder": lambda decoded: model.transformer_module(
          multi_scale_features=decoded[1:], mask_features=decoded[0]).masks_queries_logits,
  }
  images = torch.from_numpy(_images(cfg).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    features = [f.detach() for f in stages["backbone"](images)]
    decoded = [d.detach() for d in stages["pixel_decoder"](features)]
  inputs = {"backbone": [images], "pixel_decoder": features, "decoder": decoded}

  def squares(outputs):
    return 1e-6 * sum(torch.sum(torch.square(x.float())) for x in outputs)

  result = {}
  for name in STAGES:
    leaves = [x.clone().requires_grad_() for x in inputs[name]]
    stage_input = leaves[0] if name == "backbone" else leaves

    def forward(stage_input=stage_input, name=name):
      with torch.no_grad():
        stages[name](stage_input)

    def forward_backward(stage_input=stage_input, name=name):
      model.zero_grad(set_to_none=True)
      squares(stages[name](stage_input)).backward()

    result[f"{name}/forward"] = train_step.median_seconds(forward, 1, repeats)
    result[f"{name}/forward_backward"] = train_step.median_seconds(forward_backward, 1,
                                                                   repeats)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="small model at 128x128 (quick)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
  parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  cfg = train_step.make_config(args.small)
  if args.child:
    result = bench_jax(cfg, args.repeats) if args.child == "jax" else bench_torch(cfg, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)
    return
  child_args = ["--repeats", str(args.repeats)] + (["--small"] if args.small else [])
  jax_r, torch_r = (train_step.run_child(__file__, framework, child_args, malloc="huge")
                    for framework in ("jax", "torch"))
  h, w = cfg.data.image_size
  print(f"\nModel stages, CPU ({os.cpu_count()} cores), {'small Swin' if args.small else 'Swin-T'} "
        f"Mask2Former, {h}x{w}, batch {cfg.batch_size}, training mode, median of {args.repeats}:")
  print("| stage | pass | m2f_jax s | transformers s | PyTorch / JAX |")
  print("|---|---|---|---|---|")
  for name in STAGES:
    for kind in ("forward", "forward_backward"):
      key = f"{name}/{kind}"
      print(f"| {name} | {kind.replace('_', ' + ')} | {jax_r[key]:.3f} | {torch_r[key]:.3f} | "
            f"{torch_r[key] / jax_r[key]:.2f} |")


if __name__ == "__main__":
  main()
