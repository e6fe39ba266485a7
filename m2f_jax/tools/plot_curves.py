"""Draws a training run's curves into one PNG: loss terms, learning rate and validation metrics.

  python -m m2f_jax.tools.plot_curves --workdir DIR [--out DIR/curves.png]

Reads the training scalars train.py writes to DIR/tensorboard (the loss terms summed over the
decoder's predictions, as train.py prints them), and the validation metrics of
DIR/eval_history.jsonl (one JSON object a line: {"step": N, "panoptic/PQ": ...}, from evaluation
during training) and of DIR/tensorboard/eval (what eval.py writes). Drawn with PIL.
"""
import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from PIL import ImageDraw

from m2f_jax import quiet_logs

Series = Dict[str, List[Tuple[int, float]]]  # name -> [(step, value)] sorted by step

LOSS_NAMES = ("loss", "loss_ce", "loss_mask", "loss_dice")
METRIC_NAMES = ("panoptic/PQ", "panoptic/PQ_th", "panoptic/PQ_st", "instance/AP", "semantic/mIoU")
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def read_event_scalars(directory: str) -> Series:
  """Scalars of the TensorBoard event files directly in `directory` (not its subfolders)."""
  quiet_logs.quiet_third_party_logs()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  series = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                  else float(value.simple_value))
        series.setdefault(value.tag, {})[int(event.step)] = number
  return {name: sorted(points.items()) for name, points in series.items()}


def read_eval_history(path: str) -> Series:
  """Metrics of an eval_history.jsonl file; a missing file gives no series."""
  series = {}
  if not os.path.exists(path):
    return series
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        step = int(entry["step"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_number} is not a JSON object with a 'step': {e}") from e
      for name, value in entry.items():
        if name != "step" and isinstance(value, (int, float)):
          series.setdefault(name, {})[step] = float(value)
  return {name: sorted(points.items()) for name, points in series.items()}


def loss_series(train_scalars: Series) -> Series:
  """The loss terms summed over the decoder's predictions ('loss_ce_0' + ... + 'loss_ce')."""
  from m2f_jax.training.loop import sum_over_layers  # pylint: disable=g-import-not-at-top
  steps = sorted({s for points in train_scalars.values() for s, _ in points})
  at_step = {s: {} for s in steps}
  for name, points in train_scalars.items():
    if name.startswith("loss"):
      for s, v in points:
        at_step[s][name] = v
  summed = {s: sum_over_layers(values) for s, values in at_step.items()}
  return {name: [(s, summed[s][name]) for s in steps if name in summed[s]] for name in LOSS_NAMES
          if any(name in summed[s] for s in steps)}


def _ticks(low: float, high: float) -> List[float]:
  """Round values (1, 2 or 5 times a power of ten apart) from `low` to `high`, about 5 of them."""
  raw = (high - low) / 4
  power = 10.0 ** math.floor(math.log10(raw))
  spacing = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.ceil(low / spacing) * spacing
  return [first + i * spacing for i in range(int((high - first) / spacing + 1e-9) + 1)]


def _number(value: float) -> str:
  if value and abs(value) < 0.01:
    return f"{value:.0e}"
  return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def draw_chart(title: str, series: Series, size: Tuple[int, int] = (420, 300),
               empty_text: str = "no data") -> Image.Image:
  """One line chart: a line per series (with dots where a series has few points), axes, legend."""
  width, height = size
  left, right, top, bottom = 52, 10, 22, 26
  image = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(image)
  draw.text((left, 5), title, fill=(0, 0, 0))
  points = [p for values in series.values() for p in values]
  if not points:
    draw.text((width // 2, height // 2), empty_text, fill=(120, 120, 120), anchor="mm")
    return image
  x_high = max(max(s for s, _ in points), 1)
  y_low, y_high = min(min(v for _, v in points), 0.0), max(v for _, v in points)
  y_high = y_high + 0.05 * (y_high - y_low) if y_high > y_low else y_low + 1.0

  def xy(step, value):
    return (left + (width - left - right) * step / x_high,
            height - bottom - (height - top - bottom) * (value - y_low) / (y_high - y_low))

  draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
  for tick in _ticks(0, x_high):
    x, _ = xy(tick, y_low)
    draw.line((x, height - bottom, x, height - bottom + 3), fill=(0, 0, 0))
    draw.text((x, height - bottom + 5), _number(tick), fill=(0, 0, 0), anchor="mt")
  for tick in _ticks(y_low, y_high):
    _, y = xy(0, tick)
    draw.line((left - 3, y, left, y), fill=(0, 0, 0))
    draw.line((left + 1, y, width - right - 1, y), fill=(235, 235, 235))
    draw.text((left - 5, y), _number(tick), fill=(0, 0, 0), anchor="rm")
  draw.text((width - right, height - 2), "step", fill=(0, 0, 0), anchor="rd")
  for i, (name, values) in enumerate(series.items()):
    colour = COLOURS[i % len(COLOURS)]
    line = [xy(s, v) for s, v in values]
    if len(line) > 1:
      draw.line(line, fill=colour, width=2)
    if len(line) <= 20:
      for x, y in line:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    legend_y = top + 6 + 13 * i
    draw.line((width - right - 110, legend_y, width - right - 95, legend_y), fill=colour, width=2)
    draw.text((width - right - 90, legend_y), name, fill=(0, 0, 0), anchor="lm")
  return image


def curves_picture(workdir: str) -> Image.Image:
  """The three charts of a workdir side by side."""
  train = read_event_scalars(os.path.join(workdir, "tensorboard"))
  metrics = read_event_scalars(os.path.join(workdir, "tensorboard", "eval"))
  for name, points in read_eval_history(os.path.join(workdir, "eval_history.jsonl")).items():
    metrics[name] = sorted(dict(metrics.get(name, []) + points).items())
  charts = [
      draw_chart("training loss (summed over the decoder's predictions)", loss_series(train)),
      draw_chart("learning rate", {k: v for k, v in train.items() if k == "learning_rate"}),
      draw_chart("validation metrics (%)", {k: metrics[k] for k in METRIC_NAMES if k in metrics},
                 empty_text="no evaluation yet"),
  ]
  out = Image.new("RGB", (sum(c.width for c in charts), charts[0].height), (255, 255, 255))
  x = 0
  for chart in charts:
    out.paste(chart, (x, 0))
    x += chart.width
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description="Draws a training run's curves into one PNG.")
  parser.add_argument("--workdir", required=True, help="Training workdir.")
  parser.add_argument("--out", help="Output PNG (default: WORKDIR/curves.png).")
  args = parser.parse_args(argv)
  if not os.path.isdir(os.path.join(args.workdir, "tensorboard")):
    sys.exit(f"error: --workdir={args.workdir!r} has no tensorboard folder; give the workdir of a "
             "train.py run")
  out = args.out or os.path.join(args.workdir, "curves.png")
  curves_picture(args.workdir).save(out)
  print(f"curves: {out}")


if __name__ == "__main__":
  main()
