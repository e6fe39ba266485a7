"""Trains Mask2Former: `python train.py --config configs/NAME.py --workdir DIR [--config.KEY=VALUE]`.

Resumes from the latest checkpoint in DIR; `--config.init_from=VARS_DIR` starts from converted
weights instead. Multi-host: pass --coordinator_address/--num_processes/--process_id (or the
M2F_* environment variables, see m2f_jax.parallel), or --multihost to let JAX detect the cluster.
"""
from m2f_jax import host_memory  # pylint: disable=g-bad-import-order

if __name__ == "__main__":
  host_memory.relaunch_with_huge_pages()  # M2F_HUGE_PAGES=1 (CPU runs); before threads start
# pylint: disable=wrong-import-position

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from m2f_jax import command_line
from m2f_jax import multihost_flags
from m2f_jax import quiet_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/synthetic.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    quiet_logs.quiet_third_party_logs()
  multihost_flags.initialize_from_flags()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TensorFlow (data, summaries) stays off accelerators
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import loop  # pylint: disable=g-import-not-at-top
  from m2f_jax.training import workdir  # pylint: disable=g-import-not-at-top
  data.resolve_num_classes(_CONFIG.value)  # a custom data set's class count
  try:
    _, finished = loop.train(_CONFIG.value, _WORKDIR.value)
  except (workdir.WorkdirError, variables_io.DamagedCheckpointError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if not finished:
    sys.exit(143)  # stopped by SIGTERM after saving a checkpoint


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
