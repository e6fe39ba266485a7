"""Merges the evaluation results of every process of a multi-host job, exactly.

Each process evaluates its own shard of the split; `merge_evaluators` gathers every process's
accumulated state (PQ counts and matched IoUs per class, the semantic confusion matrix, the instance
ground truth and detections) and gives every process the evaluator of the whole split. The sums are
order independent (integer counts, `math.fsum` of the IoUs, COCOeval on images sorted by id), so N
processes report exactly the numbers of one.
"""
import json
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2f_jax.evaluation import evaluator as evaluator_lib


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("ascii")
  raise TypeError(f"cannot send {type(value).__name__} between processes")


def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order (two all-gathers: lengths, then padded bytes)."""
  if jax.process_count() == 1:
    return [payload]
  lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(payload)))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(payload)] = np.frombuffer(payload, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [gathered[p, :int(n)].tobytes() for p, n in enumerate(lengths)]


def allgather_json(value) -> list:
  """Every process's JSON-able `value`, in process order."""
  payload = json.dumps(value, default=_json_default).encode("utf-8")
  return [json.loads(b.decode("utf-8")) for b in allgather_bytes(payload)]


def merge_evaluators(evaluator: evaluator_lib.Evaluator) -> evaluator_lib.Evaluator:
  """This process's evaluator merged with every other process's (the same result everywhere).

  Every process must call it, with evaluators built for the same tasks and classes.
  """
  if jax.process_count() == 1:
    return evaluator
  states: Sequence[dict] = allgather_json(evaluator.state_dict())
  evaluator.load_state_dicts(states)
  return evaluator
