"""host_memory: with M2F_KEEP_HOST_MEMORY=1 freed memory is reused without page faults; off by default."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Mallocs, fills and frees 256 MB twice (as XLA:CPU does a step's temp buffer); prints whether the
# settings took and the page faults of the second round (65,536 pages of 4 KB when malloc handed
# the memory back to the OS in between).
PROBE = """
from m2f_jax import host_memory
applied = host_memory.keep_freed_memory()
import ctypes
import resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_fresh_buffer(size=1 << 28):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_fresh_buffer()
print(applied, faults_of_fresh_buffer())
"""


def _probe(enable: bool):
  env = dict(os.environ)
  env.pop("M2F_KEEP_HOST_MEMORY", None)
  if enable:
    env["M2F_KEEP_HOST_MEMORY"] = "1"
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_when_enabled():
  applied, faults = _probe(enable=True)
  assert applied and faults < 1000
  applied, faults = _probe(enable=False)
  assert not applied and faults > 30000
