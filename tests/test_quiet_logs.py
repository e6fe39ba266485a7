"""train.py / eval.py output: TensorFlow's, tensorflow_datasets' and orbax's chatter is hidden."""
import logging
import os
import subprocess
import sys

from m2f_jax import quiet_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads TensorFlow (which announces its oneDNN kernels from C++), uses a deprecated tfds field, warns
# through TensorFlow's logger as its deprecation notices do, then logs warnings of its own.
_SCRIPT = """
import logging, sys
from absl import logging as absl_logging
if sys.argv[1] == "quiet":
  from m2f_jax import quiet_logs
  quiet_logs.quiet_third_party_logs()
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
tfds.features.TensorInfo(shape=(), dtype=np.int32).dtype
tf.get_logger().warning("calling map_fn_v2 with dtype is deprecated")
absl_logging.warning("our own warning")
absl_logging.error("a tfds-style error stays")
"""


def _output(mode: str) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT)
  for variable in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
    env.pop(variable, None)
  done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=True)
  return done.stdout + done.stderr


def test_deprecation_lines_are_hidden_and_our_warnings_kept():
  loud, quiet = _output("loud"), _output("quiet")
  for line in ("TensorInfo.dtype", "map_fn_v2", "oneDNN custom operations", "absl::InitializeLog"):
    assert line in loud, loud  # what the test hides does appear without quieting
    assert line not in quiet, quiet
  assert "our own warning" in quiet and "a tfds-style error stays" in quiet


def test_filter_drops_only_their_records_below_error():
  keep = quiet_logs._BelowErrorFromPackages(("tensorflow_datasets",)).filter
  theirs = os.path.join("", "site-packages", "tensorflow_datasets", "core", "feature.py")

  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  assert not keep(record(theirs, logging.WARNING))
  assert keep(record(theirs, logging.ERROR))
  assert keep(record(os.path.join(ROOT, "m2f_jax", "data", "pipeline.py"), logging.WARNING))


def test_orbax_warnings_below_error_are_dropped():
  """eval.py restoring a training checkpoint's variables made orbax warn of a missing metadata file."""
  keep = quiet_logs._BelowErrorFromPackages(quiet_logs._QUIETED_PACKAGES).filter
  orbax_file = os.path.join("", "site-packages", "orbax", "checkpoint", "checkpoint.py")
  warning = logging.LogRecord("absl", logging.WARNING, orbax_file, 202, "Metadata file does not exist",
                              None, None)
  error = logging.LogRecord("absl", logging.ERROR, orbax_file, 202, "message", None, None)
  assert not keep(warning) and keep(error)
