"""Command-line flags that join a multi-host job, shared by train.py and eval.py."""
from absl import flags

from m2f_jax import parallel

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Let JAX detect the cluster (TPU pod, SLURM).")


def initialize_from_flags() -> None:
  """Joins the job these flags (or the M2F_* environment variables) describe; see
  `parallel.initialize_distributed`. A no-op for a single process."""
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_MULTIHOST.value)
