"""`cfg.init_from`: start a run from saved variables, also into a model with another class or
query count (fine-tuning a COCO checkpoint on your own classes).

Exactly the parameters whose shape follows `model.num_classes` or `model.decoder.num_queries`
may differ from the checkpoint; they start from the model's own initialisation and each one is
logged. Any other difference is an error naming the parameter and both shapes.
"""
import logging
from typing import Any, Callable

import flax
import jax

from m2f_jax import variables_io
from m2f_jax.training import checkpointing

# name -> (axis whose length follows the count, what the count is called in the log)
REINITIALISABLE = {
    "params/decoder/head/class_embed/kernel": (-1, "logits"),
    "params/decoder/head/class_embed/bias": (-1, "logits"),
    "params/decoder/query_feat": (0, "queries"),
    "params/decoder/query_embed": (0, "queries"),
}


def _follows_count(name: str, stored: tuple, wanted: tuple) -> bool:
  """True when `name` is re-initialisable and its shapes differ only along the counted axis."""
  if name not in REINITIALISABLE or len(stored) != len(wanted):
    return False
  axis = REINITIALISABLE[name][0] % len(wanted)
  return all(a == b for i, (a, b) in enumerate(zip(stored, wanted)) if i != axis)


def _reinit_message(name: str, stored: tuple, wanted: tuple) -> str:
  axis, what = REINITIALISABLE[name]
  short = name.split("/", 1)[1]
  return (f"re-initialised: {short} {stored} -> {wanted} "
          f"({stored[axis]} -> {wanted[axis]} {what})")


def load_variables(path: str, target: Any,
                   fresh_variables: Callable[[], Any]) -> tuple[dict, list[str]]:
  """Variables of the model described by `target`, read from `path`.

  Args:
    path: a converted variables directory (DIR/variables + DIR/config.json), a training workdir
      (its latest checkpoint) or one step directory of a workdir.
    target: {'params', 'batch_stats'} of jax.ShapeDtypeStruct (with shardings) of the model.
    fresh_variables: () -> the model's own initial variables, shaped and placed like `target`;
      called only when some parameter is re-initialised.

  Returns:
    (variables shaped and placed like `target`, the log lines of re-initialised parameters).

  Raises:
    ValueError naming every other parameter that is missing, unexpected or of another shape.
  """
  directory = checkpointing.variables_directory(path)
  stored = variables_io.stored_shapes(directory)
  flat_target = flax.traverse_util.flatten_dict(target, sep="/", keep_empty_nodes=True)
  wanted = {k: tuple(v.shape) for k, v in flat_target.items()
            if v is not flax.traverse_util.empty_node}
  problems = [f"  missing in checkpoint: {k} {wanted[k]}" for k in sorted(set(wanted) - set(stored))]
  problems += [f"  unexpected in checkpoint: {k} {stored[k]}"
               for k in sorted(set(stored) - set(wanted))]
  reinit = {}
  for name in sorted(set(stored) & set(wanted)):
    if stored[name] == wanted[name]:
      continue
    if _follows_count(name, stored[name], wanted[name]):
      reinit[name] = stored[name]
    else:
      problems.append(f"  shape differs: {name} checkpoint {stored[name]} vs model {wanted[name]}")
  if problems:
    more = [f"  ... and {len(problems) - 20} more"] if len(problems) > 20 else []
    raise ValueError(
        f"init_from={path} does not fit the model built from this config (only the class head and "
        "the query embeddings may differ, they are re-initialised):\n"
        + "\n".join(problems[:20] + more))

  restore_target = {k: (v if k not in reinit else
                        jax.ShapeDtypeStruct(reinit[k], v.dtype, sharding=v.sharding))
                    for k, v in flat_target.items()}
  variables = variables_io.load_variables(
      directory, flax.traverse_util.unflatten_dict(restore_target, sep="/"))
  messages = []
  if reinit:
    flat = flax.traverse_util.flatten_dict(variables, sep="/", keep_empty_nodes=True)
    fresh = flax.traverse_util.flatten_dict(fresh_variables(), sep="/")
    for name, shape in reinit.items():
      flat[name] = fresh[name]
      messages.append(_reinit_message(name, shape, wanted[name]))
      logging.warning("init_from %s: %s", path, messages[-1])
    variables = flax.traverse_util.unflatten_dict(flat, sep="/")
  return variables, messages
