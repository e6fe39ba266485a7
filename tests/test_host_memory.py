"""host_memory: with M2F_HUGE_PAGES=1 the relaunch turns malloc's huge pages on (keeping argv and
other tunables), without it nothing changes, and
with them a fresh 256 MB buffer page-faults far less often; release_freed_memory hands freed heap
memory back to the kernel."""
import os
import subprocess
import sys

import pytest

from m2f_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not host_memory.glibc_available(),
    reason="needs Linux and glibc")
needs_huge_pages = pytest.mark.skipif(not host_memory.transparent_huge_pages_available(),
                                      reason="needs transparent huge pages ('always' or 'madvise')")

RELAUNCH = """
from m2f_jax import host_memory
host_memory.relaunch_with_huge_pages()
import os, sys
print(os.environ.get("GLIBC_TUNABLES", ""), *sys.argv[1:])
"""
# malloc and free from libc, for the probes below (each runs in a fresh process).
LIBC = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""
# Mallocs, fills and frees 256 MB twice (as XLA:CPU does a step's temp buffer); prints the page
# faults of the second round (65,536 pages of 4 KB when malloc handed the memory back to the OS).
PROBE = LIBC + """
import resource

def faults_of_fresh_buffer(size=1 << 28):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_fresh_buffer()
print(faults_of_fresh_buffer())
"""

# Fills 256 MB of 64 KB heap blocks and frees all but the last (which keeps the heap's top, so
# free() itself trims nothing); prints the MB of resident memory release_freed_memory() gives back.
TRIM = LIBC + """
import os
from m2f_jax import host_memory

def resident_mb():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [libc.malloc(1 << 16) for _ in range(4096)]
for block in blocks:
  ctypes.memset(block, 1, 1 << 16)
for block in blocks[:-1]:
  libc.free(block)
before = resident_mb()
host_memory.release_freed_memory()
print(before - resident_mb())
"""


def _run(code: str, args=(), **environ) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.ENABLE_VARIABLE)}
  env.update(environ)
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=True).stdout.strip()


@needs_huge_pages
def test_relaunch_adds_the_tunable_and_keeps_arguments():
  assert _run(RELAUNCH, ["a", "--b=1"], GLIBC_TUNABLES="glibc.malloc.check=0",
              M2F_HUGE_PAGES="1") == f"glibc.malloc.check=0:{host_memory.TUNABLE} a --b=1"
  assert _run(RELAUNCH, ["a"], M2F_HUGE_PAGES="1") == f"{host_memory.TUNABLE} a"


def test_relaunch_is_opt_in():
  assert _run(RELAUNCH, ["a"]) == "a"
  assert _run(RELAUNCH, ["a"], M2F_HUGE_PAGES="0") == "a"


@needs_huge_pages
def test_huge_pages_cut_page_faults_of_fresh_buffers():
  default = int(_run(PROBE))
  huge = int(_run(PROBE, GLIBC_TUNABLES=host_memory.TUNABLE))
  assert default > 30000, default
  assert huge * 4 < default, (huge, default)


def test_release_freed_memory_returns_freed_heap_pages():
  assert float(_run(TRIM)) > 200, "less than 200 of 256 freed MB went back to the kernel"
