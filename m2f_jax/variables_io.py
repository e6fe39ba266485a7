"""Model variables on disk: an orbax checkpoint plus the config that built them.

Layout of a variables directory (what `tools.convert` writes and `init_from` / `--checkpoint` read):
  DIR/variables/   orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
  DIR/config.json  the ml_collections config of the model
"""
import json
import os
from typing import Any, Mapping, Optional

import ml_collections
import orbax.checkpoint as ocp


def save_variables(directory: str, variables: Mapping[str, Any],
                   cfg: Optional[ml_collections.ConfigDict] = None) -> None:
  """Writes `variables` (and `cfg`, if given) under `directory`; refuses to overwrite."""
  directory = os.path.abspath(directory)
  target = os.path.join(directory, "variables")
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; choose another --out directory or remove it")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, dict(variables))
  if cfg is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))


class DamagedCheckpointError(ValueError):
  """A checkpoint directory whose files cannot be read back (truncated, emptied, missing parts)."""

  def __init__(self, path: str, cause: BaseException):
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [""]
    reason = f"{type(cause).__name__}: {lines[0][:160]}"
    super().__init__(f"checkpoint {path} is damaged or incomplete ({reason})")
    self.path = path


def stored_tree(path: str) -> Any:
  """The tree of array metadata (with .shape) stored in an orbax item directory `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    try:
      item = ckptr.metadata(path).item_metadata
    except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds here
      raise DamagedCheckpointError(path, e) from e
  tree = getattr(item, "tree", None)
  if not isinstance(tree, Mapping):
    raise DamagedCheckpointError(path, ValueError("its _METADATA file is missing, empty or unreadable"))
  return tree


def check_fits(path: str, target: Any) -> None:
  """Raises ValueError (naming the differing entries) if the tree stored at `path` differs from `target`."""
  _check_same_structure(stored_tree(path), target)


def load_variables(directory: str, target: Optional[Any] = None) -> dict:
  """Reads the variables saved by `save_variables`.

  With `target` (a pytree of arrays or jax.ShapeDtypeStruct, e.g. from `jax.eval_shape(model.init, ...)`)
  the stored tree must match it exactly; a mismatch raises a ValueError naming the differing entries.
  Files that cannot be read back raise DamagedCheckpointError naming the directory.
  """
  path = _variables_path(directory)
  if target is not None:
    check_fits(path, target)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(path) if target is None else ckptr.restore(path, target)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore raises plain Exception
      raise DamagedCheckpointError(path, e) from e


def stored_shapes(directory: str) -> dict:
  """Shape of every array saved by `save_variables`, by name ('params/decoder/query_feat'),
  read from the checkpoint's metadata (no array is loaded)."""
  return _flatten(stored_tree(_variables_path(directory)))


def _variables_path(directory: str) -> str:
  path = os.path.join(os.path.abspath(directory), "variables")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no model variables at {path} (expected a directory written by "
                            "`python -m m2f_jax.tools.convert` or `save_variables`)")
  return path


def load_config(directory: str) -> Optional[dict]:
  """The config saved beside the variables, as a plain dict, or None when there is none."""
  path = os.path.join(os.path.abspath(directory), "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _flatten(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tuple(getattr(tree, "shape", ()))}


def _check_same_structure(stored: Any, target: Any) -> None:
  a, b = _flatten(stored), _flatten(target)
  missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
  wrong = sorted(k for k in set(a) & set(b) if a[k] != b[k])
  if missing or extra or wrong:
    lines = [f"  missing in checkpoint: {k} {b[k]}" for k in missing[:10]]
    lines += [f"  unexpected in checkpoint: {k} {a[k]}" for k in extra[:10]]
    lines += [f"  shape differs: {k} checkpoint {a[k]} vs model {b[k]}" for k in wrong[:10]]
    raise ValueError("checkpoint does not fit the model built from this config:\n" + "\n".join(lines))
