"""predict on the images users bring: every PIL mode, EXIF orientation, shared names, directories,
and a panoptic.json that `python -m m2f_jax.evaluation.pq` scores against the data set's JSON.

One `python -m m2f_jax.tools.predict` run (a tiny randomly initialised model, every image 48x64,
so one compiled forward) serves all the tests of its outputs.
"""
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from m2f_jax import image_io
from m2f_jax import variables_io
from m2f_jax.data import info as info_lib
from m2f_jax.evaluation import panoptic_format
from m2f_jax.models import build_model
from m2f_jax.training import state as state_lib
from tests.test_training import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 48, 64
def predict_config():
  """tiny_config() on the synthetic set's 8 classes, kept at 48x64, every query shown."""
  cfg = tiny_config()
  cfg.model.num_classes = 8
  cfg.data.min_size_test, cfg.data.max_size_test, cfg.data.eval_pad_size = H, W, (W, W)
  cfg.eval.object_mask_threshold = 0.0
  cfg.eval.overlap_threshold = 0.0
  return cfg


def gray_pattern() -> np.ndarray:
  """uint8 [H, W] with every grey level and some structure."""
  y, x = np.mgrid[:H, :W]
  return ((x * 4 + y * 3 + (x // 8 + y // 8) % 2 * 60) % 256).astype(np.uint8)


def color_pattern() -> np.ndarray:
  rng = np.random.default_rng(0)
  image = np.zeros((H, W, 3), np.uint8)
  image[..., 0] = gray_pattern()
  image[: H // 2, : W // 3, 1] = 200
  image[H // 3:, W // 2:, 2] = 150
  return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def write_exif_rotated_jpeg(path: str, upright: np.ndarray) -> np.ndarray:
  """Stores `upright` turned 90 degrees counter-clockwise with EXIF orientation 6 (display turns
  it 90 degrees clockwise); returns the upright image the JPEG's decoded pixels make."""
  stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
  exif = Image.Exif()
  exif[0x0112] = 6
  stored.save(path, quality=95, exif=exif.tobytes())
  with Image.open(path) as jpeg:
    decoded = np.asarray(jpeg.convert("RGB"))
  return np.ascontiguousarray(np.rot90(decoded, k=-1))


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
  """Inputs, the predict run's output directory and its stdout."""
  tmp = tmp_path_factory.mktemp("predict")
  inputs = tmp / "in"
  (inputs / "dir").mkdir(parents=True)
  gray = gray_pattern()
  Image.fromarray(gray).save(inputs / "plain.png")
  Image.fromarray(gray.astype(np.uint16) * 257).save(inputs / "sixteen.png")  # mode I;16
  upright = write_exif_rotated_jpeg(str(inputs / "rotated.jpg"), color_pattern())
  Image.fromarray(upright).save(inputs / "upright.png")
  colour = color_pattern()
  Image.fromarray(colour).save(inputs / "a.png")
  Image.fromarray(colour[::-1]).save(inputs / "a.jpg", quality=95)
  Image.fromarray(colour[:, ::-1]).save(inputs / "dir" / "a.jpg", quality=95)
  Image.fromarray(colour).save(inputs / "000000000007.png")

  cfg = predict_config()
  model = build_model(cfg)
  variables = state_lib.init_variables(model, jax.random.key(1), (W, W))
  variables_io.save_variables(str(tmp / "vars"), jax.device_get(variables), cfg)
  (tmp / "tiny_predict_config.py").write_text(  # the values only: a config file that imports little
      f"import ml_collections\n\n\ndef get_config():\n"
      f"  return ml_collections.ConfigDict({cfg.to_dict()!r})\n")
  out = tmp / "out"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  proc = subprocess.run(
      [sys.executable, "-m", "m2f_jax.tools.predict", f"--config={tmp / 'tiny_predict_config.py'}",
       f"--checkpoint={tmp / 'vars'}", f"--out={out}", str(inputs)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return dict(inputs=inputs, out=out, stdout=proc.stdout, tmp=tmp)


def _outputs(out, name) -> dict:
  files = {"panoptic_png": out / "panoptic" / f"{name}.png"}
  files.update({task: out / f"{name}_{task}.png" for task in ("panoptic", "instance", "semantic")})
  return {k: np.asarray(Image.open(p)) for k, p in files.items()}


def _assert_same_outputs(out, a, b):
  first, second = _outputs(out, a), _outputs(out, b)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=f"{key}: {a} vs {b}")


def test_16_bit_png_gives_the_outputs_of_the_8_bit_image(predicted):
  _assert_same_outputs(predicted["out"], "sixteen", "plain")


def test_exif_rotated_jpeg_gives_the_outputs_of_the_upright_image(predicted):
  _assert_same_outputs(predicted["out"], "rotated", "upright")
  assert _outputs(predicted["out"], "rotated")["semantic"].shape == (H, W, 3)


def test_every_input_gets_its_own_outputs_and_image_id(predicted):
  out = predicted["out"]
  with open(out / "panoptic" / "panoptic.json") as f:
    result = json.load(f)
  by_file = {a["file_name"]: a["image_id"] for a in result["annotations"]}
  assert set(by_file) == {"plain.png", "sixteen.png", "rotated.png", "upright.png", "a_jpg.png",
                          "a_png.png", "dir/a.png", "000000000007.png"}
  assert len(set(by_file.values())) == len(by_file)
  assert by_file["000000000007.png"] == 7 and by_file["a_png.png"] == "a_png"
  pictures = [_outputs(out, n)["semantic"] for n in ("a_jpg", "a_png", "dir/a")]
  assert not np.array_equal(pictures[0], pictures[1])
  assert not np.array_equal(pictures[1], pictures[2])
  assert f"{predicted['inputs'] / 'dir' / 'a.jpg'}: dir/a_panoptic.png" in predicted["stdout"]


def test_panoptic_json_uses_the_data_sets_category_ids_and_scores_with_the_pq_tool(predicted):
  out, tmp = predicted["out"], predicted["tmp"]
  info = info_lib.dataset_info_by_name("synthetic")
  with open(out / "panoptic" / "panoptic.json") as f:
    result = json.load(f)
  assert [c["id"] for c in result["categories"]] == list(info.category_ids) == list(range(1, 9))
  used = {s["category_id"] for a in result["annotations"] for s in a["segments_info"]}
  assert used and used <= set(info.category_ids)
  # ground truth of image 7 in COCO's format: a disc (id 1) on sky (id 6)
  gt_dir = tmp / "gt"
  gt_dir.mkdir()
  ids = np.full((H, W), 2, np.int32)
  ids[10:30, 10:40] = 1
  panoptic_format.write_id_png(str(gt_dir / "000000000007.png"), ids)
  gt = dict(images=[dict(id=7, file_name="000000000007.png", height=H, width=W)],
            annotations=[dict(image_id=7, file_name="000000000007.png", segments_info=[
                dict(id=1, category_id=1, iscrowd=0, area=600),
                dict(id=2, category_id=6, iscrowd=0, area=H * W - 600)])],
            categories=[dict(id=i, name=n, isthing=int(t)) for i, n, t in
                        zip(info.category_ids, info.class_names, info.is_thing)])
  (tmp / "gt.json").write_text(json.dumps(gt))
  proc = subprocess.run(
      [sys.executable, "-m", "m2f_jax.evaluation.pq", "--gt-json", str(tmp / "gt.json"),
       "--gt-dir", str(gt_dir), "--pred-json", str(out / "panoptic" / "panoptic.json"),
       "--pred-dir", str(out / "panoptic"), "--out", str(tmp / "pq.json")],
      env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(tmp / "pq.json") as f:
    assert 0.0 <= json.load(f)["All"]["pq"] <= 1.0


# ------------------------------------------------------------------ image modes (no model)
def _roundtrip(image: Image.Image, fmt: str = "PNG", **save_args) -> np.ndarray:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **save_args)
  buffer.seek(0)
  with Image.open(buffer) as reopened:
    reopened.load()
    return image_io.to_rgb(reopened)


def test_every_mode_converts_to_the_expected_rgb(tmp_path):
  gray = gray_pattern()
  colour = color_pattern()
  expect_gray = np.repeat(gray[..., None], 3, -1)
  np.testing.assert_array_equal(_roundtrip(Image.fromarray(gray)), expect_gray)  # L
  np.testing.assert_array_equal(_roundtrip(Image.fromarray(gray.astype(np.uint16) * 257)),
                                expect_gray)  # I;16
  np.testing.assert_array_equal(image_io.to_rgb(Image.fromarray(gray.astype(np.int32) * 257)),
                                expect_gray)  # I (32-bit)
  ramp = np.arange(W, dtype=np.uint16)[None].repeat(H, 0) * 1000  # 0..63000, not a multiple of 257
  np.testing.assert_array_equal(_roundtrip(Image.fromarray(ramp))[..., 0],
                                np.rint(ramp / 257).astype(np.uint8))
  np.testing.assert_array_equal(_roundtrip(Image.fromarray(colour).convert("RGBA")), colour)
  alpha = Image.fromarray(gray).convert("LA")
  np.testing.assert_array_equal(_roundtrip(alpha), expect_gray)  # LA: alpha dropped
  bits = gray > 127
  np.testing.assert_array_equal(_roundtrip(Image.fromarray(bits)),
                                np.repeat(bits[..., None], 3, -1).astype(np.uint8) * 255)  # '1'
  palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30], [200, 200, 200]], np.uint8)
  indices = (gray // 64).astype(np.uint8)
  p_image = Image.fromarray(indices, mode="P")
  p_image.putpalette(palette.flatten().tolist())
  np.testing.assert_array_equal(_roundtrip(p_image), palette[indices])  # P: palette looked up
  p_image.info["transparency"] = 0
  np.testing.assert_array_equal(_roundtrip(p_image, transparency=0), palette[indices])
  cmyk = np.zeros((H, W, 4), np.uint8)
  cmyk[..., 0], cmyk[..., 3] = gray, 255 - gray // 2  # cyan and black
  ink = 255 - cmyk.astype(np.float64)  # (1 - C)(1 - K), (1 - M)(1 - K), (1 - Y)(1 - K)
  expected = np.rint(ink[..., :3] * ink[..., 3:] / 255).astype(np.uint8)
  np.testing.assert_array_equal(image_io.to_rgb(Image.fromarray(cmyk, mode="CMYK")), expected)


def test_unreadable_inputs_are_named(tmp_path):
  (tmp_path / "notes.jpg").write_text("not an image")
  with pytest.raises(ValueError, match=r"notes.jpg: not a readable image"):
    image_io.read_rgb(str(tmp_path / "notes.jpg"))
  with pytest.raises(ValueError, match=r"missing.png: no such file"):
    image_io.read_rgb(str(tmp_path / "missing.png"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty: a directory without images"):
    image_io.expand_inputs([str(tmp_path / "empty")])


def test_output_names_and_ids_are_distinct():
  names = image_io.output_names(["in/a.jpg", "in/a.png", "in/dir/a.jpg", "in/A.JPG", "in/a.JPG",
                                 "in/000000000012.jpg", "in/x/000000000012.jpg", "in/13.png"])
  assert names == ["a_jpg", "a_png", "dir/a", "A", "a_jpg_2", "000000000012",
                   "x/000000000012", "13"]
  assert image_io.image_ids(names) == ["a_jpg", "a_png", "dir/a", "A", "a_jpg_2", "000000000012",
                                       "x/000000000012", 13]
  assert image_io.output_names(["/data/val/one.jpg"]) == ["one"]


def test_category_ids_invert_the_builders_contiguous_mapping():
  from m2f_jax.data import categories  # pylint: disable=g-import-not-at-top
  from m2f_jax.data import coco  # pylint: disable=g-import-not-at-top
  for name, table in (("coco_panoptic", categories.COCO_PANOPTIC),
                      ("coco_instance", categories.COCO_INSTANCE)):
    info = info_lib.dataset_info_by_name(name)
    as_json = {"categories": [dict(id=c[0], name=c[1]) for c in reversed(table)]}
    to_contiguous = coco.contiguous_categories(as_json, info.num_classes, name)
    assert [to_contiguous[i] for i in info.category_ids] == list(range(info.num_classes))
  assert info_lib.dataset_info_by_name("coco_panoptic").category_ids[-1] == 200  # rug-merged
  assert info_lib.dataset_info_by_name("ade20k_semantic").category_ids[:2] == (1, 2)  # PNG values
  assert info_lib.dataset_info_by_name("ade20k_panoptic").category_ids[:2] == (0, 1)
  assert info_lib.dataset_info_by_name("cityscapes_semantic").category_ids[:3] == (7, 8, 11)
  assert info_lib.dataset_info_by_name("cityscapes_instance").category_ids == (
      24, 25, 26, 27, 28, 31, 32, 33)
  for name in info_lib.DATASET_KINDS:
    info = info_lib.dataset_info_by_name(name)
    assert len(set(info.category_ids)) == info.num_classes == len(info.class_names)
