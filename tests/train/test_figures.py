"""What a run shows, rendered on the host: prediction grid, curve panels, heatmaps, TensorBoard."""

import functools
import json

import numpy as np
import pytest

from mtjax.tasks import detection
from mtjax.train import figures

NAMES = ("segmentation", "depth", "normals")


def test_grid_puts_each_task_target_next_to_its_prediction():
  n, h, w = 2, 6, 5
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, h, w, 3)).astype(np.float32)
  seg = rng.integers(0, 4, size=(n, h, w))
  depth = rng.uniform(1, 3, size=(n, h, w)).astype(np.float32)
  normals = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  targets = {"segmentation": seg, "depth": depth, "normals": normals, "classification": [1, 2]}
  predictions = {"segmentation": seg, "depth": depth, "normals": -normals,
                 "classification": np.array([1, 0])}  # not a map: left out
  grid = figures.grid_image(images, targets, predictions, {"segmentation": 4})
  assert grid.shape == (n * h, 7 * w, 3) and grid.min() >= 0 and grid.max() <= 1
  cell = lambda row, col: grid[row * h:(row + 1) * h, col * w:(col + 1) * w]  # noqa: E731
  np.testing.assert_array_equal(cell(0, 1), cell(0, 2))  # exact segmentation: same colours
  np.testing.assert_array_equal(cell(1, 3), cell(1, 4))  # exact depth, one colour scale
  np.testing.assert_allclose(cell(0, 5) + cell(0, 6), 1.0, atol=1e-6)  # n and -n as RGB
  assert np.all(cell(0, 1)[seg[0] == 0] == 0)  # the background class is black



def test_grid_draws_detections_over_the_segmentation(tmp_path, monkeypatch):
  """A detection task's cells: the image with the segmentation blended in (target, prediction)
  and its boxes drawn on them, the ground truth's and the detections scoring >= 0.3, labelled
  with the class name (and score)."""
  import matplotlib.pyplot as plt

  from mtjax.tasks import detection_plot
  n, h, w = 2, 16, 12
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(n, h, w, 3)).astype(np.float32)
  seg = np.zeros((n, h, w), np.int64)
  seg[:, 4:10, 3:9] = 2
  boxes = np.tile(np.array([0.25, 0.25, 0.625, 0.75], np.float32), (n, 3, 1))
  targets = {"detection": {"boxes": boxes, "box_classes": np.array([[2, 0, 0], [2, 1, 0]])},
             "segmentation": seg}
  detections = {"boxes": boxes, "classes": np.array([[2, 1, 3]] * n),
                "scores": np.array([[0.9, 0.2, 0.5]] * n), "valid": np.array([[1, 1, 0]] * n) > 0}
  predictions = {"detection": detections, "segmentation": np.zeros_like(seg)}
  grid = figures.grid_image(images, targets, predictions, {"segmentation": 3})
  assert grid.shape == (n * h, 5 * w, 3)
  cell = lambda row, col: grid[row * h:(row + 1) * h, col * w:(col + 1) * w]  # noqa: E731
  # The target cell: the image where the class is background, blended where it is not; the
  # prediction cell (all background predicted): the image.
  np.testing.assert_array_equal(cell(0, 1)[seg[0] == 0], cell(0, 0)[seg[0] == 0])
  assert np.all(np.abs(cell(0, 1) - cell(0, 0))[seg[0] == 2] > 0)
  np.testing.assert_array_equal(cell(1, 2), cell(1, 0))

  calls = []
  draw = detection_plot.draw_boxes
  monkeypatch.setattr(detection_plot, "draw_boxes", lambda *a, **k: calls.append(
      (k["offset"], draw(*a, **k))) or calls[-1][1])
  names = ("background", "sphere", "cube", "cone")
  pixels = figures.prediction_grid(str(tmp_path / "grid.png"), images, targets, predictions,
                                   {"segmentation": 3}, class_names={"detection": names},
                                   draw={"detection": functools.partial(detection.draw,
                                                                        num_classes=3)})
  assert (tmp_path / "grid.png").exists() and pixels.ndim == 3 and pixels.shape[-1] == 3
  # Per row: the truth's real boxes in column 1, the valid detections of score >= 0.3 in 2.
  assert calls == [((0, w), 1), ((0, 2 * w), 1), ((h, w), 2), ((h, 2 * w), 1)]

  fig, ax = plt.subplots()
  drawn = draw(ax, boxes[0], detections["classes"][0], (h, w), scores=detections["scores"][0],
               valid=detections["valid"][0], class_names=names, offset=(h, 2 * w))
  assert drawn == 1 and [t.get_text() for t in ax.texts] == ["cube 0.90"]
  np.testing.assert_allclose(ax.patches[0].get_xy(), (0.25 * w + 2 * w - 0.5, 0.25 * h + h - 0.5))
  np.testing.assert_allclose((ax.patches[0].get_width(), ax.patches[0].get_height()),
                             (0.5 * w, 0.375 * h))
  plt.close(fig)
  assert detection_plot.class_names_of(names, 3) == names            # background first
  assert detection_plot.class_names_of(names[1:], 3) == names        # without it: added
  assert detection_plot.class_names_of(names, 8) is None             # another numbering

def _log(path, steps=4):
  rng = np.random.default_rng(1)
  records = []
  for s in range(1, steps + 1):
    m = rng.uniform(-1, 1, (3, 3))
    records.append({"step": s, "split": "train", "loss": 1.0, "loss/depth": 1.0 / s,
                    "weight/depth": 1.0, "conflict/cosine": ((m + m.T) / 2).tolist(),
                    "conflict/fraction": 0.5, "relations/cross_stitch/stage2": m.tolist(),
                    "relations/gate/depth": [0.5, 0.5]})
    if s % 2 == 0:
      records.append({"step": s, "split": "validation", "validation/depth/abs_err": 1.0 / s,
                      "validation/segmentation/miou": 0.1 * s})
  records.append({"step": 3, "split": "affinity", "affinity": np.eye(3).tolist()})
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return records


def test_curves_heatmaps_and_tensorboard_from_a_log(tmp_path):
  records = _log(tmp_path / "metrics.jsonl")
  figures.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").stat().st_size > 0
  # Every square matrix, the relations of the sharing architectures too; not the gate vector.
  assert figures.matrix_keys(records) == ["affinity", "conflict/cosine",
                                          "relations/cross_stitch/stage2"]
  assert figures.relation_heatmaps(str(tmp_path / "metrics.jsonl"),
                                   str(tmp_path / "relations.png"), NAMES)
  (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "split": "train"}) + "\n")
  assert not figures.relation_heatmaps(str(tmp_path / "empty.jsonl"),
                                       str(tmp_path / "none.png"), NAMES)
  assert not (tmp_path / "none.png").exists()
  pytest.importorskip("tensorboardX")  # the optional extra (in the test extra, so CI has it)
  board = figures.TensorBoard(str(tmp_path / "tb"), NAMES)
  board.scalars(records[0], 1)
  board.image("predictions", np.zeros((4, 4, 3)), 1)
  board.close()
  assert figures.events_in(str(tmp_path / "tb"))


def test_figures_show_whole_task_names_and_the_conflict_threshold(tmp_path, monkeypatch):
  from matplotlib.figure import Figure

  seen = []
  save = Figure.savefig

  def spy(fig, *args, **kwargs):
    seen.append([(ax.get_title(), [t.get_text() for t in ax.get_xticklabels()],
                  [t.get_text() for t in ax.get_yticklabels()]) for ax in fig.axes])
    return save(fig, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", spy)
  _log(tmp_path / "metrics.jsonl")
  names = ("segmentation", "depth", "normals")
  figures.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"),
                      conflict_threshold=-0.1)
  assert "conflicting gradient pairs (cos < -0.1)" in [title for title, _, _ in seen[0]]
  figures.relation_heatmaps(str(tmp_path / "metrics.jsonl"), str(tmp_path / "r.png"), names)
  heatmaps = [(x, y) for title, x, y in seen[1] if "\n" in title]  # "key\nstep N"
  assert heatmaps and all(x == list(names) and y == list(names) for x, y in heatmaps)
