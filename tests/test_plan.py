"""The fit planner (m2f_jax/tools/plan.py) on CPU compiles of a tiny config: its report is jax's
own memory and cost analysis of the real programs, and a config that does not fit exits non-zero.
TPU topologies need libtpu, which CI does not install: docs/plan.md has those runs."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from absl import flags

from m2f_jax.tools import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join("tests", "data", "plan_tiny_config.py")
MEMORY_FIELDS = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
                 "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
                 "generated_code_bytes": "generated_code_size_in_bytes"}


def _tiny_config():
  spec = importlib.util.spec_from_file_location("plan_tiny_config", os.path.join(ROOT, TINY))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def planned():
  return plan.plan(_tiny_config(), "cpu", per_chip_batch=2, log=lambda _: None)


def _agrees_with_jax(numbers: dict, compiled, platform: str = "cpu") -> None:
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  for field, attr in MEMORY_FIELDS.items():
    assert numbers[field] == getattr(memory, attr), field
  if platform == "cpu":
    assert numbers["peak_bytes"] == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  else:
    assert numbers["peak_bytes"] == memory.peak_memory_in_bytes
  assert numbers["flops"] == cost["flops"]
  assert numbers["bytes_accessed"] == cost["bytes accessed"]


def test_report_has_every_number_of_both_programs(planned):
  report, compiled = planned
  chips = len(jax.devices("cpu"))
  assert report["chips"] == chips and report["platform"] == "cpu" and report["hbm_bytes"] is None
  assert report["num_params"] > 0 and "lower bound" in report["note"]
  assert report["train"]["global_batch"] == 2 * chips and report["train"]["image_hw"] == [64, 64]
  assert report["eval"]["per_chip_batch"] == max(1, -(-2 // chips))  # eval.batch_size 2 over chips
  for name in ("train", "eval"):
    numbers = report[name]
    for field in ("compile_seconds", "argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
                  "flops", "bytes_accessed"):
      assert numbers[field] > 0, (name, field)
    assert numbers["fits"] is None and numbers["error"] is None
    _agrees_with_jax(numbers, compiled[name])
  # The donated train state comes back in its own buffers; the forward donates nothing.
  assert report["train"]["alias_bytes"] > 0 and report["eval"]["alias_bytes"] == 0
  text = plan.format_report(report)
  for label in ("train step", "evaluation forward", "arguments", "temporaries", "generated code",
                "peak memory", "FLOPs", "bytes accessed", "lower bound",
                "unknown (give --hbm_gib)"):
    assert label in text


def test_command_line_exits_non_zero_when_the_peak_exceeds_the_hbm(planned, tmp_path):
  report, compiled = planned
  out = tmp_path / "plan.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,  # conftest's cache
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  proc = subprocess.run(
      [sys.executable, "-m", "m2f_jax.tools.plan", f"--config={TINY}", "--topology=cpu",
       "--per_chip_batch=2", "--hbm_gib=0.001", f"--json={out}"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert lines == [f"error: the {name} program does not fit cpu: its peak "
                   f"{plan._size(report[name]['peak_bytes'])} per chip exceeds the "
                   f"{plan._size(int(0.001 * plan.GIB))} of HBM"
                   for name in ("train", "eval")]
  assert "DOES NOT FIT" in proc.stdout
  written = json.loads(out.read_text())
  assert written["hbm_bytes"] == int(0.001 * plan.GIB)
  for name in ("train", "eval"):  # the same programs compiled in another process
    assert written[name]["fits"] is False
    _agrees_with_jax(written[name], compiled[name])


def test_tiny_config_fits_a_v5e_2x2():
  """Runs where libtpu is installed (requirements-tpu.txt); CI has no libtpu and skips it."""
  pytest.importorskip("libtpu")
  report, compiled = plan.plan(_tiny_config(), "v5e:2x2", per_chip_batch=2, log=lambda _: None)
  assert (report["platform"], report["chips"], report["hbm_bytes"]) == ("tpu", 4, 16 * plan.GIB)
  assert report["device_kind"] == "TPU v5 lite" and report["train"]["global_batch"] == 8
  for name in ("train", "eval"):
    assert report[name]["fits"] is True and report[name]["flops"] > 0
    assert report[name]["generated_code_bytes"] > 0  # TPU code lives in HBM
    _agrees_with_jax(report[name], compiled[name], "tpu")
  assert plan.failures(report) == []


@pytest.mark.parametrize("name", ["v5x:2x2", "v5e:2x2x1", "v4:2x2", "tpu", ""])
def test_bad_topology_names_the_accepted_forms(name):
  with pytest.raises(ValueError, match=r"is not a topology; give cpu .*v5e:AxB") as error:
    plan.chip_family(name)
  assert "\n" not in str(error.value)


def test_out_of_memory_compile_is_reported_with_the_compilers_message():
  class Lowered:
    def compile(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 18.4G "
                         "of 15.75G hbm.\nmore detail")

  compiled, numbers = plan.measure(Lowered(), "tpu", hbm_bytes=16 * plan.GIB)
  assert compiled is None and numbers["fits"] is False
  report = {"topology": "v5e:2x2", "hbm_bytes": 16 * plan.GIB, "train": numbers}
  assert plan.failures(report) == [
      "the train program does not fit v5e:2x2: the compiler ran out of memory (RESOURCE_EXHAUSTED: "
      "Ran out of memory in memory space hbm. Used 18.4G of 15.75G hbm.)"]


def test_planner_imports_beside_the_other_tools():
  """The planner's flags are defined only when it runs as a program, so importing it beside the
  tools whose absl flags share its names (convert's --config) defines nothing twice."""
  import m2f_jax.tools.convert  # pylint: disable=g-import-not-at-top,unused-import
  assert "topology" not in flags.FLAGS and callable(plan.define_flags)
