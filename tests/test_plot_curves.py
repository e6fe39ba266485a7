"""m2f_jax.tools.plot_curves: reads what train.py and in-training evaluation write, draws it."""
import numpy as np
import pytest
import tqdm

from m2f_jax.tools import plot_curves
from m2f_jax.training import loop


def _metrics(step):
  return {"loss": float(step), "loss_ce": 1.0, "loss_ce_0": 2.0, "loss_mask": 0.5,
          "loss_dice": 0.25, "learning_rate": 1e-3 / step, "grad_norm": 1.0, "skipped": 0.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with the training scalars of steps 10 and 20 (written by the loop's logger) and
  an eval_history.jsonl."""
  path = tmp_path_factory.mktemp("run")
  logger = loop._Logger(str(path), batch_size=2, enabled=True)
  for step in (10, 20):
    logger.add(_metrics(step))
    logger.flush(step, 0, tqdm.tqdm(disable=True))
  logger.close()
  (path / "eval_history.jsonl").write_text(
      '{"step": 10, "panoptic/PQ": 12.5}\n\n{"step": 20, "panoptic/PQ": 30.0, "best": "x"}\n')
  return path


def test_reads_the_loss_terms_summed_over_predictions(workdir):
  train = plot_curves.read_event_scalars(str(workdir / "tensorboard"))
  assert train["learning_rate"] == [(10, pytest.approx(1e-4)), (20, pytest.approx(5e-5))]
  losses = plot_curves.loss_series(train)
  assert losses["loss_ce"] == [(10, 3.0), (20, 3.0)]
  assert losses["loss"] == [(10, 10.0), (20, 20.0)]
  assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice"}
  assert plot_curves.read_eval_history(str(workdir / "eval_history.jsonl")) == {
      "panoptic/PQ": [(10, 12.5), (20, 30.0)]}
  assert plot_curves.read_eval_history(str(workdir / "missing.jsonl")) == {}


def test_picture_draws_every_chart(workdir):
  picture = np.asarray(plot_curves.curves_picture(str(workdir)))
  assert picture.shape == (300, 3 * 420, 3)
  for chart, colour in ((0, plot_curves.COLOURS[0]), (1, plot_curves.COLOURS[0]),
                        (2, plot_curves.COLOURS[0])):
    part = picture[:, chart * 420:(chart + 1) * 420].reshape(-1, 3)
    assert (part == colour).all(-1).sum() > 50, f"chart {chart} has no line"


def test_bad_history_line_is_named(tmp_path):
  (tmp_path / "eval_history.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="eval_history.jsonl:2"):
    plot_curves.read_eval_history(str(tmp_path / "eval_history.jsonl"))
