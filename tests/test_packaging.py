"""pyproject.toml and requirements.txt pin the same versions, and the wheel holds the library."""
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(lines) -> dict:
  """{'jax': '0.10.2', ...} from requirement lines 'name[extra]==version'."""
  out = {}
  for line in lines:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)\s*(#.*)?", line)
    if match:
      out[match.group(1).lower().replace("_", "-")] = match.group(3)
  return out


def _project() -> dict:
  with open(os.path.join(_ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _requirements() -> dict:
  with open(os.path.join(_ROOT, "requirements.txt")) as f:
    return _pins(f)


def _runtime_requirements() -> dict:
  """Pins of requirements.txt's runtime section (from its start to the '# Tests' comment)."""
  with open(os.path.join(_ROOT, "requirements.txt")) as f:
    text = f.read()
  return _pins(text.split("# Tests")[0].splitlines())


def test_runtime_pins_agree_with_requirements():
  project, requirements = _project(), _requirements()
  assert _pins(project["dependencies"]) == _runtime_requirements()
  for extra in ("torch", "test"):
    for name, version in _pins(project["optional-dependencies"][extra]).items():
      assert requirements.get(name) == version, f"[{extra}] {name}: pyproject {version}, requirements.txt {requirements.get(name)}"


def test_accelerator_extras_pin_the_same_jax():
  project = _project()
  jax_version = _pins(project["dependencies"])["jax"]
  for extra in ("gpu", "tpu"):
    assert _pins(project["optional-dependencies"][extra]) == {"jax": jax_version}, extra


def test_tpu_requirements_are_the_tpu_extra_on_top_of_requirements():
  with open(os.path.join(_ROOT, "requirements-tpu.txt")) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert lines[0] == "-r requirements.txt"
  assert _pins(lines[1:]) == _pins(_project()["optional-dependencies"]["tpu"])


def test_wheel_holds_library_and_configs(tmp_path):
  source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("m2f_jax", "configs"):
    shutil.copytree(os.path.join(_ROOT, name), source / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(_ROOT, name), source / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
  (wheel,) = list((tmp_path / "dist").glob("*.whl"))
  names = set(zipfile.ZipFile(wheel).namelist())
  for path in ("m2f_jax/__init__.py", "m2f_jax/models/mask2former.py", "m2f_jax/convert/hf.py",
               "configs/base.py", "configs/coco_panoptic_r50.py"):
    assert path in names, f"{path} missing from {wheel.name}"
  assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
