"""Flag parsing for the entry points: a mistyped `--config.KEY=VALUE` is one line naming the key.

ml_collections raises a bare AttributeError ("'foo'") from deep inside absl's parser for an
override of a key the recipe does not have; `parse_flags` (pass it to `app.run(main,
flags_parser=parse_flags)`) turns that into `error: ...` with the closest existing keys.
"""
import difflib
import importlib.util
import sys
from typing import Optional, Sequence

from absl import app
import ml_collections


def _config_path(argv: Sequence[str], flag: str) -> Optional[str]:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("_m2f_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _keys(config, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(_keys(value, f"{prefix}{key}."))
  return out


def unknown_override(argv: Sequence[str], flag: str = "config") -> Optional[str]:
  """A one-line message about the first `--FLAG.KEY=...` whose KEY the recipe lacks, else None."""
  path = _config_path(argv, flag)
  if path is None:
    return None
  keys = set(_keys(_load_config(path)))
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    key = arg[len(flag) + 3:].split("=", 1)[0]
    if key not in keys:
      close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
      hint = f"did you mean {', '.join(close)}?" if close else "see the recipe file for its keys"
      return f"--{flag}.{key}: {path} has no config key '{key}'; {hint}"
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing with one-line errors (for app.run's flags_parser)."""
  try:
    return app.parse_flags_with_usage(argv)  # flag errors: absl's own one-line message
  except (AttributeError, KeyError):
    message = unknown_override(argv)
    if message is None:
      raise
    sys.exit(f"error: {message}")
