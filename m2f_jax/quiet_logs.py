"""Keeps other libraries' chatter out of what train.py and eval.py print.

TensorFlow (here only for the input pipeline and TensorBoard files) prints INFO lines from C++ as it
loads (CPU features, oneDNN), and TensorFlow and tensorflow_datasets warn about deprecated calls
inside their own code; orbax warns that a checkpoint item has no metadata file when eval.py restores
the variables of a training checkpoint. None of it is something a user of this project can act on. Their errors
still show, and so does everything of this project's own code; `--verbosity=0` or higher
(absl's flag) leaves all logs as they are.
"""
import logging
import os

_QUIETED_PACKAGES = ("tensorflow", "tensorflow_datasets", "orbax")


class _BelowErrorFromPackages(logging.Filter):
  """Drops records below ERROR that come from the source files of the given packages."""

  def __init__(self, packages):
    super().__init__()
    self._markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not any(m in record.pathname for m in self._markers)


def quiet_third_party_logs() -> None:
  """Hides TensorFlow's, tensorflow_datasets' and orbax's INFO and WARNING lines. Call before importing
  TensorFlow (its C++ logging reads TF_CPP_MIN_LOG_LEVEL once, at load)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # 1: C++ warnings and errors only
  # TensorFlow announces its oneDNN kernels whatever the level; they only serve TF's own math
  # (convolutions, matmuls), which the input pipeline does not use.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  logging.getLogger("tensorflow").setLevel(logging.ERROR)
  absl_logger = logging.getLogger("absl")  # tensorflow_datasets logs through absl.logging
  if not any(isinstance(f, _BelowErrorFromPackages) for f in absl_logger.filters):
    absl_logger.addFilter(_BelowErrorFromPackages(_QUIETED_PACKAGES))
