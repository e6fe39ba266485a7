"""What an XLA program keeps alive at its memory peak, from a dump of its buffer assignment.

  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" \
      PYTHONPATH=/path/to/libtpu python -m m2f_jax.tools.plan --config ... --programs train
  python benchmarks/xla_live_at_peak.py /tmp/dump --top 30

Reads the `*after_optimizations-buffer-assignment.txt` (each value's padded size and layout) and
`*after_optimizations-live-range.txt` (each value's first and last step in the schedule) of the
first module in DIR whose name contains --module, sums the sizes of the values live at each step,
and prints the values live at the largest sum grouped by shape and layout, largest first. The sum
ignores fragmentation, so it is at most the compiler's temporaries; it says which arrays the peak
holds (docs/memory_levers.md, "What the backward pass keeps", was found this way).
"""
import argparse
import collections
import glob
import os
import re

VALUE = re.compile(r"\s*value: <\d+ (\S+?)(\{[^}]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)")
LIVE_RANGE = re.compile(r"\s*(\S+?)(\{[^}]*\}):(\d+)-(\d+)$")


def dump_file(directory: str, module: str, suffix: str) -> str:
  paths = sorted(glob.glob(os.path.join(directory, f"*{module}*{suffix}")))
  if not paths:
    raise SystemExit(f"no *{module}*{suffix} in {directory}: was XLA_FLAGS=--xla_dump_to set?")
  return paths[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("directory", help="the --xla_dump_to directory")
  parser.add_argument("--module", default="", help="part of the module's file name, e.g. step_fn")
  parser.add_argument("--top", type=int, default=25, help="shape groups to print")
  args = parser.parse_args()
  sizes = {}
  with open(dump_file(args.directory, args.module, "after_optimizations-buffer-assignment.txt")) as f:
    for line in f:
      match = VALUE.match(line)
      if match:
        sizes[(match[1], match[2] or "{}")] = (int(match[3]), match[4])
  ranges = []
  with open(dump_file(args.directory, args.module, "after_optimizations-live-range.txt")) as f:
    in_ranges = False
    for line in f:
      in_ranges = in_ranges or "BufferLiveRange" in line
      match = LIVE_RANGE.match(line) if in_ranges else None
      if match and (match[1], match[2]) in sizes:
        ranges.append((int(match[3]), int(match[4]), (match[1], match[2])))
  change = collections.Counter()
  for start, end, key in ranges:
    change[start] += sizes[key][0]
    change[end + 1] -= sizes[key][0]
  live, peak, peak_step = 0, 0, 0
  for step in sorted(change):
    live += change[step]
    if live > peak:
      peak, peak_step = live, step
  by_shape, count = collections.Counter(), collections.Counter()
  for start, end, key in ranges:
    if start <= peak_step <= end:
      size, shape = sizes[key]
      by_shape[shape] += size
      count[shape] += 1
  print(f"{peak / 2**30:.3f} GiB live at step {peak_step} (fragmentation not counted)")
  for shape, size in by_shape.most_common(args.top):
    print(f"{size / 2**20:9.1f} MiB  {count[shape]:4d} x {shape}")


if __name__ == "__main__":
  main()
