"""Transparent huge pages for malloc'd memory on CPU runs: opt in with M2F_HUGE_PAGES=1 (Linux, glibc).

XLA:CPU allocates each step's temporary buffers anew (3.3 GB for a Swin-T train step at 384x384).
glibc maps such blocks fresh and unmaps them on free, so every step page-faults through all of its
temporary memory again, 4 KB at a time: about 900,000 faults a Swin-T step. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask the kernel for transparent huge pages (madvise), and the
step faults a few thousand times, 2 MB at a time (benchmarks/train_step.py on 2 cores: 6.6-7.3 ->
5.0-5.4 s per step). On GPU and TPU the step's buffers live on the device and this buys nothing,
so it is off unless asked for.

glibc reads tunables once, when the process starts, so `relaunch_with_huge_pages()` re-executes
the program (same process id, same arguments) with the tunable added to GLIBC_TUNABLES. It does
so only with M2F_HUGE_PAGES=1 in the environment, and not when the tunable is already set, on
other systems or when the kernel's transparent huge pages are off.

Compiling a Swin-T train step on CPU frees about 1.3 GB into malloc's heaps, where it stays. The
step's temporaries are large mmap'd blocks that cannot reuse it, so it would add to the peak
resident memory of every step; `release_freed_memory()` after the compile hands it back to the
kernel (m2f_jax.training.step calls it for CPU compiles only).
"""
import ctypes
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENABLE_VARIABLE = "M2F_HUGE_PAGES"  # "1": relaunch with huge pages
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages_available() -> bool:
  """Whether the kernel hands out transparent huge pages on request ('always' or 'madvise')."""
  try:
    with open(_THP_MODE_FILE) as f:
      mode = f.read()
  except OSError:
    return False
  return "[always]" in mode or "[madvise]" in mode


def glibc_available() -> bool:
  """Whether this process runs on GNU libc (whose malloc reads GLIBC_TUNABLES)."""
  try:
    return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
  except (ValueError, OSError):  # not a glibc system
    return False


def _tunables(environ) -> list:
  """The entries of environ's GLIBC_TUNABLES."""
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def environment_with_huge_pages(environ) -> dict:
  """A copy of `environ` whose GLIBC_TUNABLES also asks malloc for huge pages."""
  environ = dict(environ)
  tunables = _tunables(environ)
  environ["GLIBC_TUNABLES"] = ":".join(tunables + ([] if TUNABLE in tunables else [TUNABLE]))
  return environ


def relaunch_with_huge_pages() -> None:
  """With M2F_HUGE_PAGES=1, re-executes this program with malloc's huge pages on, where they are
  off and can be had.

  Call it first thing in a program's entry point, before anything starts threads or prints.
  """
  if (os.environ.get(ENABLE_VARIABLE) != "1" or not sys.platform.startswith("linux")
      or TUNABLE in _tunables(os.environ)
      or not glibc_available() or not transparent_huge_pages_available()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment_with_huge_pages(os.environ))


def release_freed_memory() -> None:
  """Returns the free pages of malloc's heaps to the kernel (glibc's malloc_trim); a no-op
  elsewhere. Costs milliseconds; call it after a compile, before the first step runs."""
  if glibc_available():
    ctypes.CDLL(None).malloc_trim(0)
