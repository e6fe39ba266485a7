"""Optionally keeps freed host memory in the process for reuse (glibc malloc settings).

XLA:CPU allocates each step's temporary buffers anew. With glibc's defaults, large blocks are
mapped on allocation and handed back to the OS on free, so every step page-faults through all of
its temporary memory again: about 900,000 faults a Swin-T train step at 384x384 on CPU. One malloc
arena, no separately mapped blocks and no trimming keep the freed pages mapped, and the faults go
away; the process's resident memory then stays at its peak. The single arena also serialises the
allocations of all threads, which costs more than it saves when steps are small and threads many:
the synthetic demo trains at 24 instead of 28.5 images/s with it. Hence opt-in, for large models on
CPU: `M2F_KEEP_HOST_MEMORY=1` in the environment.

`keep_freed_memory()` must run before jax or TensorFlow start threads (a thread is tied to an arena
at its first allocation); train.py and eval.py call it first thing.
"""
import ctypes
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENABLE_VARIABLE = "M2F_KEEP_HOST_MEMORY"


def keep_freed_memory() -> bool:
  """Applies the settings when M2F_KEEP_HOST_MEMORY=1; returns whether they took (Linux, glibc)."""
  if os.environ.get(ENABLE_VARIABLE, "0") != "1" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
  return all(mallopt(parameter, value) == 1 for parameter, value in settings)
