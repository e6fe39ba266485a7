"""Evaluates a checkpoint: `python eval.py --config configs/NAME.py --workdir DIR` (latest checkpoint
of a training run) or `--checkpoint PATH` (a step directory or a variables directory written by
`python -m m2f_jax.tools.convert`). Runs every task of cfg.eval.tasks the data set supports and
writes eval_metrics.json, TensorBoard scalars (tensorboard/eval) and overlay pictures to the workdir
(or, without --workdir, beside the checkpoint). Multi-host: the flags of train.py
(--coordinator_address/--num_processes/--process_id or --multihost); every process evaluates its
shard of the split, the metrics are merged exactly and process 0 writes the files.
"""
from m2f_jax import host_memory  # pylint: disable=g-bad-import-order

if __name__ == "__main__":
  host_memory.relaunch_with_huge_pages()  # M2F_HUGE_PAGES=1 (CPU runs); before threads start
# pylint: disable=wrong-import-position

import json
import math
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: its latest checkpoint is evaluated "
                               "and the results are written there.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint step directory or converted "
                                  "variables directory (overrides the workdir's latest checkpoint).")
_SPLIT = flags.DEFINE_string("split", None, "Data split (default: cfg.data.eval_split or 'validation').")
_NUM_VISUALIZE = flags.DEFINE_integer("num_visualize", 0, "Overlay pictures to write (eval_NNNN.png).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not (_WORKDIR.value or _CHECKPOINT.value):
    raise app.UsageError("give --workdir (evaluate its latest checkpoint) or --checkpoint PATH")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every restore and backend at INFO
    quiet_logs.quiet_third_party_logs()
  multihost_flags.initialize_from_flags()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TensorFlow (data, summaries) stays off accelerators
  import jax  # pylint: disable=g-import-not-at-top
  from m2f_jax import data  # pylint: disable=g-import-not-at-top
  from m2f_jax import models  # pylint: disable=g-import-not-at-top
  from m2f_jax import parallel  # pylint: disable=g-import-not-at-top
  from m2f_jax import variables_io  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from m2f_jax.evaluation import loop  # pylint: disable=g-import-not-at-top

  cfg = _CONFIG.value
  data.resolve_num_classes(cfg)  # a custom data set's class count
  checkpoint = _CHECKPOINT.value or _WORKDIR.value
  out_dir = _WORKDIR.value or checkpoint
  mesh = parallel.make_mesh()
  if cfg.eval.batch_size % mesh.devices.size:
    raise ValueError(f"eval.batch_size={cfg.eval.batch_size} must be a multiple of the "
                     f"{mesh.devices.size} devices; set --config.eval.batch_size")
  model = models.build_model(cfg)
  try:
    variables, step_dir, why = loop.load_checkpoint(cfg, model, checkpoint, mesh)
  except (FileNotFoundError, variables_io.DamagedCheckpointError) as e:
    sys.exit(f"error: {e}")
  print(f"evaluating {why}", flush=True)
  info = data.get_dataset_info(cfg.data)
  split = _SPLIT.value or cfg.data.get("eval_split", "validation")
  total = data.get_builder(cfg.data).info.splits[split].num_examples
  if cfg.eval.max_images:
    total = min(total, int(cfg.eval.max_images))
  batches = data.eval_iterator(cfg, split=split, process_index=jax.process_index(),
                               process_count=jax.process_count())
  summary = loop.evaluate(cfg, model, variables, batches, info, mesh, out_dir=out_dir,
                          step=loop.checkpoint_step(step_dir), checkpoint=step_dir,
                          num_visualize=_NUM_VISUALIZE.value,
                          total_batches=math.ceil(total / cfg.eval.batch_size))
  if jax.process_index() != 0:
    return
  headline = evaluator.headline(summary)
  print(json.dumps(headline, indent=2))
  main_metrics = [(n, headline[k]) for n, k in (("PQ", "panoptic/PQ"), ("AP", "instance/AP"),
                                                 ("mIoU", "semantic/mIoU")) if k in headline]
  print("  ".join(f"{name} {value:.2f}" for name, value in main_metrics))
  print(f"{summary['num_images']} images in {summary['seconds']:.1f} s; metrics: {summary['metrics_path']}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=command_line.parse_flags)
