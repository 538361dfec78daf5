"""What a run looks like, rendered on the host at evaluation and at the end (matplotlib, Agg).

* :func:`prediction_grid`: a few validation images, each task's ground truth and prediction
  side by side (segmentation as class colours, a scalar map such as depth in one colour scale
  shared by target and prediction, a 3-vector map such as normals as RGB ``(n + 1) / 2``;
  a prediction that is not a map (a mapping, such as detections) drawn by its task's ``draw``
  over the image, with the run's first class map blended in).
* :func:`plot_curves`: training losses, task weights, the gradient-conflict fraction, and one
  panel per validation metric.
* :func:`relation_heatmaps`: every (T, T) matrix of the log (``conflict/cosine``,
  ``affinity``, ``relations/*``) as heatmaps at a few logged steps and their mean.
* :class:`TensorBoard`: the same scalars and images as TensorBoard event files (tensorboardX,
  the optional extra ``tensorboard``; no TensorFlow).
"""

import json
import os
from collections.abc import Mapping

import numpy as np

MATRIX_KEYS = ("conflict/cosine", "affinity")
CURVE_METRICS = None  # every validation metric gets a panel


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _palette(n: int) -> np.ndarray:
  """``n`` distinct RGB colours (class 0, the background, black)."""
  import matplotlib
  cmap = matplotlib.colormaps["tab20"]
  colours = np.array([cmap(i % 20)[:3] for i in range(max(n, 1))])
  colours[0] = 0.0
  return colours


def render(values, *, kind: str, num_classes: int = 0, vrange=None) -> np.ndarray | None:
  """An (H, W, 3) float image in [0, 1] of one map, or None for what is not a map."""
  v = np.asarray(values)
  if kind == "classes":
    labels = v.astype(np.int64)
    out = _palette(num_classes)[np.clip(labels, 0, num_classes - 1)]
    out[(labels < 0) | (labels >= num_classes)] = 1.0  # ignored pixels: white
    return out
  if kind == "scalar":
    import matplotlib
    lo, hi = vrange if vrange is not None else (float(np.min(v)), float(np.max(v)))
    scaled = np.clip((v - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    return matplotlib.colormaps["viridis"](scaled)[..., :3]
  if kind == "vector":
    unit = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)
    return np.clip((unit + 1.0) / 2.0, 0.0, 1.0)
  return None


def map_kind(prediction) -> str | None:
  """How a task's per-example prediction is drawn: by its shape and dtype."""
  p = np.asarray(prediction)
  if p.ndim == 2 and np.issubdtype(p.dtype, np.integer):
    return "classes"
  if p.ndim == 2:
    return "scalar"
  if p.ndim == 3 and p.shape[-1] == 3:
    return "vector"
  return None


def _shown(targets: dict, predictions: dict) -> list[tuple[str, str]]:
  """``(task, kind)`` of the tasks the grid shows, in order: maps (``classes``, ``scalar``,
  ``vector``) and ``drawn`` (a prediction that is a mapping, drawn by its task); tasks without
  a target or of another output are left out."""
  shown = []
  for name, pred in predictions.items():
    kind = "drawn" if isinstance(pred, Mapping) else map_kind(pred[0])
    if kind is not None and name in targets:
      shown.append((name, kind))
  return shown


def overlay(image, segmentation, num_classes: int) -> np.ndarray:
  """``image`` (H, W, 3) in [0, 1] with the class colours of ``segmentation`` (H, W) blended
  over it where the class is not the background (0) nor ignored; ``image`` if None."""
  image = np.asarray(image, np.float32)
  if segmentation is None or num_classes < 2:
    return image
  labels = np.asarray(segmentation).astype(np.int64)
  colours = _palette(num_classes)[np.clip(labels, 0, num_classes - 1)]
  shown = ((labels > 0) & (labels < num_classes))[..., None]
  return np.where(shown, 0.55 * image + 0.45 * colours, image)


def grid_image(images, targets: dict, predictions: dict, num_classes: dict) -> np.ndarray:
  """The prediction grid as one (rows·H, cols·W, 3) array: a row per example, the image then
  each shown task's target and prediction (tasks whose outputs are neither maps nor mappings
  are left out). A ``drawn`` task's two cells are the image with the first class map's target
  and prediction blended over it (the plain image without one); its task draws on them in
  :func:`prediction_grid`."""
  images = np.asarray(images, np.float32)
  lo, hi = float(images.min()), float(images.max())
  shown = _shown(targets, predictions)
  class_map = next((name for name, kind in shown if kind == "classes"), None)
  rows = []
  for n in range(images.shape[0]):
    image = (images[n] - lo) / max(hi - lo, 1e-8)
    cells = [image]
    for name, kind in shown:
      pred = predictions[name]
      if kind == "drawn":
        k = num_classes.get(class_map, 0)
        for seg in (targets.get(class_map), predictions.get(class_map)):
          cells.append(overlay(image, None if seg is None else seg[n], k))
        continue
      target = np.asarray(targets[name][n])
      if kind == "vector" or kind == "classes":
        vrange = None
      else:
        finite = target[np.isfinite(target)]
        vrange = ((float(finite.min()), float(finite.max())) if finite.size
                  else (float(pred[n].min()), float(pred[n].max())))
      for value in (target, pred[n]):
        cells.append(render(value, kind=kind, num_classes=num_classes.get(name, 0),
                            vrange=vrange))
    rows.append(np.concatenate(cells, axis=1))
  return np.concatenate(rows, axis=0)


def _example(values, n: int):
  """Example ``n`` of a batch of arrays or of a mapping of them."""
  if isinstance(values, Mapping):
    return {k: v[n] for k, v in values.items()}
  return values[n]


def prediction_grid(path: str, images, targets: dict, predictions: dict, num_classes: dict,
                    title: str = "", class_names: dict | None = None,
                    draw: dict | None = None) -> np.ndarray:
  """Writes the grid of :func:`grid_image` to ``path`` with column titles, each ``drawn``
  task drawing its target and prediction on its two cells (``draw``: ``{task: the task's
  draw}``, :class:`mtjax.tasks.base.Task`); returns the written image as an (H, W, 3) array in
  [0, 1]. ``class_names``: ``{task: the dataset's class names}`` handed to ``draw``."""
  plt = _pyplot()
  grid = grid_image(images, targets, predictions, num_classes)
  shown = _shown(targets, predictions)
  columns = ["image"] + [f"{name} {which}" for name, _ in shown
                         for which in ("target", "prediction")]
  height, width = np.asarray(images).shape[1:3]
  scale = 1.6 / max(height, width)  # inches per pixel: 1.6 inch a cell
  fig, ax = plt.subplots(figsize=(max(grid.shape[1] * scale, 4),
                                  grid.shape[0] * scale + 0.6))
  ax.imshow(grid, interpolation="nearest")
  for col, (name, kind) in enumerate(shown):
    if kind != "drawn" or name not in (draw or {}):
      continue
    for n in range(grid.shape[0] // height):
      at = n * height
      draw[name](ax, _example(targets[name], n), _example(predictions[name], n),
                 image_size=(height, width),
                 offsets=((at, (2 * col + 1) * width), (at, (2 * col + 2) * width)),
                 class_names=(class_names or {}).get(name))
  ax.set_xlim(-0.5, grid.shape[1] - 0.5)   # labels near an edge do not widen the axes
  ax.set_ylim(grid.shape[0] - 0.5, -0.5)
  ax.set_xticks([(i + 0.5) * width for i in range(len(columns))])
  ax.set_xticklabels(columns, fontsize=7, rotation=20)
  ax.xaxis.tick_top()
  ax.set_yticks([])
  if title:
    ax.set_xlabel(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
  plt.close(fig)
  return pixels


def read_log(log_path: str) -> list[dict]:
  with open(log_path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: str, png_path: str, final: dict | None = None,
                conflict_threshold: float | None = None) -> None:
  """Training losses and task weights against the step, the fraction of conflicting gradient
  pairs when logged (pairs with cosine below ``conflict_threshold``, default
  :data:`mtjax.relations.CONFLICT_THRESHOLD`, as the log counts them), and one panel per
  validation metric (every evaluation a point; ``final``, a validation record ``{"step": N,
  "validation/<task>/<metric>": value}``, adds the final evaluation, which the log does not
  hold)."""
  plt = _pyplot()
  records = read_log(log_path)
  if final:
    records.append({"split": "validation", **final})
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "validation"]
  metrics = sorted({k for r in val for k in r if k.startswith("validation/")})
  panels = [("loss/", "training loss"), ("weight/", "task weight")]
  if any("conflict/fraction" in r for r in train):
    from mtjax.relations import CONFLICT_THRESHOLD
    threshold = CONFLICT_THRESHOLD if conflict_threshold is None else conflict_threshold
    panels.append(("conflict/fraction", f"conflicting gradient pairs (cos < {threshold:g})"))
  n = len(panels) + len(metrics)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
  axes = axes.ravel()
  for ax, (prefix, title) in zip(axes, panels, strict=False):
    keys = sorted({k for r in train for k in r if k.startswith(prefix) and
                   np.ndim(r[k]) == 0 and (prefix.endswith("/") and k.count("/") == 1
                                           or k == prefix)})
    for key in keys:
      pts = [(r["step"], r[key]) for r in train if key in r]
      ax.plot(*zip(*pts, strict=True), label=key[len(prefix):] or None)
    ax.set(title=title, xlabel="step")
    if prefix == "loss/":
      ax.set_yscale("log")
    if prefix == "conflict/fraction":
      ax.set_ylim(-0.05, 1.05)
  for ax, key in zip(axes[len(panels):], metrics, strict=False):
    pts = [(r["step"], r[key]) for r in val if key in r]
    ax.plot(*zip(*pts, strict=True), marker="o")
    ax.set(title=key[len("validation/"):], xlabel="step")
  for ax in axes[n:]:
    ax.axis("off")
  for ax in axes[:n]:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
  plt.close(fig)


def matrix_keys(records) -> list[str]:
  """The (T, T) matrices a log holds: conflict cosine, affinity, and any ``relations/*``."""
  keys = set()
  for r in records:
    for k, v in r.items():
      if (k in MATRIX_KEYS or k.startswith("relations/")) and np.ndim(v) == 2 and \
          np.shape(v)[0] == np.shape(v)[1]:
        keys.add(k)
  return sorted(keys)


def relation_heatmaps(log_path: str, png_path: str, names, max_steps: int = 5,
                      titles: dict | None = None) -> bool:
  """One row per (T, T) matrix in the log: heatmaps at up to ``max_steps`` logged steps
  (evenly spread) and their mean over all of them (``titles``: a key's title, default the key,
  e.g. the level of the conflict cosine). Returns False (and writes nothing) when the log has
  none."""
  records = read_log(log_path)
  keys = matrix_keys(records)
  if not keys:
    return False
  plt = _pyplot()
  rows = []
  for key in keys:
    found = [(r["step"], np.asarray(r[key], np.float64)) for r in records if key in r]
    pick = np.unique(np.linspace(0, len(found) - 1, min(max_steps, len(found))).astype(int))
    rows.append((key, [found[i] for i in pick], np.mean([m for _, m in found], axis=0),
                 len(found)))
  cols = max(len(shown) for _, shown, _, _ in rows) + 1
  fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols, 2.5 * len(rows)),
                           squeeze=False)
  for (key, shown, mean, count), row in zip(rows, axes, strict=True):
    t = mean.shape[0]
    ticks = list(names) if len(names) == t else [str(i) for i in range(t)]
    cells = [*[(f"step {s}", m) for s, m in shown], (f"mean of {count}", mean)]
    for ax, (title, m) in zip(row, cells, strict=False):
      # Cosines on their own scale; other matrices (the affinity scales with the learning rate
      # of its step) each on a symmetric scale of their own: blue helps, red hurts.
      limit = 1.0 if key == "conflict/cosine" else float(np.max(np.abs(m))) or 1.0
      ax.imshow(m, cmap="RdBu", vmin=-limit, vmax=limit)
      for i in range(t):
        for j in range(t):
          ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=6)
      ax.set_xticks(range(t))
      ax.set_xticklabels(ticks, fontsize=6, rotation=35, ha="right")
      ax.set_yticks(range(t))
      ax.set_yticklabels(ticks, fontsize=6)
      ax.set_title(f"{(titles or {}).get(key, key)}\n{title}", fontsize=7)
    for ax in row[len(cells):]:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(png_path, dpi=90)
  plt.close(fig)
  return True


class TensorBoard:
  """TensorBoard event files in ``logdir`` through tensorboardX (no TensorFlow): scalars, the
  off-diagonal entries of (T, T) matrices as ``<key>/<i>-><j>`` scalars, and images."""

  def __init__(self, logdir: str, names):
    try:
      from tensorboardX import SummaryWriter
    except ImportError as e:
      raise ImportError("config.tensorboard: needs tensorboardX (pip install "
                        "'mtjax[tensorboard]')") from e
    self._writer = SummaryWriter(logdir)
    self._names = tuple(names)

  def scalars(self, record: dict, step: int) -> None:
    for key, value in record.items():
      if key in ("step", "split"):
        continue
      v = np.asarray(value, np.float64)
      if v.ndim == 0:
        self._writer.add_scalar(key, float(v), step)
      elif v.ndim == 2 and v.shape[0] == v.shape[1]:
        t = v.shape[0]
        labels = self._names if len(self._names) == t else [str(i) for i in range(t)]
        for i in range(t):
          for j in range(t):
            if i != j:
              self._writer.add_scalar(f"{key}/{labels[i]}->{labels[j]}", v[i, j], step)

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    self._writer.add_image(tag, np.asarray(image, np.float32), step, dataformats="HWC")

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


def events_in(logdir: str) -> list[str]:
  """The event files in ``logdir``."""
  if not os.path.isdir(logdir):
    return []
  return sorted(f for f in os.listdir(logdir) if f.startswith("events.out.tfevents"))
