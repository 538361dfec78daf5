"""The task contract: a task owns its head, its labels and its pure functions.

``loss_fn(output, batch) -> loss`` or ``(loss, {part: scalar})`` (the parts are logged);
``metrics_fn(output, batch) -> {name: (sum, count)}``, sums and counts that stay exact under
padding, masking and device sharding; ``predict_fn(output)``; and, for metrics that are not
sums (COCO AP), an optional host-side :class:`Evaluator` fed with ``predict_fn``'s output.
What is particular to a task's labels stays with the task: ``bilinear_keys`` and ``augment``
say how its labels follow the image under :mod:`mtjax.data.augment` (normals flip their x,
depth scales, boxes are cropped), ``draw`` how a prediction that is not a map is drawn in the
prediction grid (:func:`mtjax.train.figures.prediction_grid`).
A batch may carry ``mask`` (B,) for padded examples and ``<task>_mask`` (B,) for examples whose
label for this task is missing: losses and metrics skip them.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np


class Evaluator(NamedTuple):
  """Host-side metrics over a whole split: ``result(update(...update(init(), p, b)...))``.

  ``update(state, predictions, batch)`` receives numpy arrays: ``predict_fn``'s output and the
  host batch (with its ``mask`` of padded examples); ``result(state) -> {metric: float}``.
  ``check()`` (optional) raises ImportError, naming the package and how to install it, when a
  library the evaluator needs is missing: ``setup.build`` calls it, so a run fails before
  training rather than at its first evaluation.
  """

  init: Callable[[], Any]
  update: Callable[[Any, Any, Mapping[str, np.ndarray]], Any]
  result: Callable[[Any], dict[str, float]]
  check: Callable[[], None] | None = None


class Task(NamedTuple):
  """One task: its head factory, its label spec and its pure functions."""

  name: str
  # head(hidden=..., dtype=...) -> a Linen module mapping (features, output_size, train) to the
  # task's output.
  head: Callable[..., Any]
  loss_fn: Callable
  metrics_fn: Callable
  predict_fn: Callable
  # label_spec(image_size) -> {batch key: (shape of one example, dtype)}: what the task reads.
  label_spec: Callable[[tuple[int, int]], dict[str, tuple[tuple[int, ...], Any]]]
  # Metric name -> True where higher is better; these are the metrics Δm% averages over.
  higher_is_better: Mapping[str, bool]
  summarize_fn: Callable | None = None  # totals -> {metric: float}; default sum / count
  evaluator: Evaluator | None = None
  # Label keys resampled bilinearly when an augmentation resizes (a continuous field such as
  # normals); the others by nearest neighbour, so that no label takes a value it never had.
  bilinear_keys: tuple[str, ...] = ()
  # {augmentation: fn(labels, **params) -> {key: value}}: how the task's labels change beyond
  # the image's own resampling (``labels``: its keys present in the example, already mirrored
  # or cropped like the image where they are maps); params of ``hflip``: none; of
  # ``scale_crop``: ``scale``, ``crop`` (i, j, h, w) and ``size`` (H, W).
  augment: Mapping[str, Callable[..., dict]] | None = None
  # draw(ax, target, prediction, *, image_size, offsets, class_names): draws one example's
  # target and prediction (not maps) on the grid's cells at (y, x) ``offsets``.
  draw: Callable[..., None] | None = None


def label_keys(task: Task) -> tuple[str, ...]:
  """The batch keys ``task`` reads (besides ``image`` and the masks)."""
  return tuple(task.label_spec((1, 1)))


def loss_and_parts(task: Task, output, batch):
  """``(loss, {part: value})`` in float32, whether ``loss_fn`` returns parts or not."""
  value = task.loss_fn(output, batch)
  loss, parts = value if isinstance(value, tuple) else (value, {})
  return (jnp.asarray(loss, jnp.float32),
          {k: jnp.asarray(v, jnp.float32) for k, v in parts.items()})


def check_batch(tasks: Mapping[str, Task], batch, image_size, batch_size: int) -> None:
  """Raises ValueError when ``batch`` lacks a key the tasks read or has the wrong shape."""
  expected = {"image": ((*image_size, 3), None)}
  for task in tasks.values():
    expected.update(task.label_spec(tuple(image_size)))
  for key, (shape, _) in expected.items():
    if key not in batch:
      raise ValueError(f"batch: missing {key!r}, needed by tasks {tuple(tasks)}")
    want = (batch_size, *shape)
    if tuple(batch[key].shape) != want:
      raise ValueError(f"batch[{key!r}]: shape {tuple(batch[key].shape)} does not match the "
                       f"config (batch_size, dataset.image_size, classes): expected {want}")


def needs_classes(name: str, num_classes):
  """``num_classes`` if it is a positive int, else a ValueError naming the task."""
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"task {name!r}: num_classes: expected a positive int (from the dataset's "
                     f"per-task info), got {num_classes!r}")
  return int(num_classes)


def example_mask(batch, task: str, batch_size: int):
  """(B,) float32: 1 where the example is real and labelled for ``task``."""
  mask = jnp.ones((batch_size,), jnp.float32)
  for key in ("mask", f"{task}_mask"):
    if key in batch:
      mask = mask * jnp.asarray(batch[key], jnp.float32).reshape(batch_size)
  return mask


def masked_mean(values, weights):
  """``Σ w v / max(Σ w, 1)``: zero, not NaN, when nothing is valid."""
  weights = jnp.broadcast_to(weights, values.shape).astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def ratio(total, count):
  """Mean over the entries with a non-zero count of ``total / count`` (scalar or per class)."""
  total, count = np.asarray(total, np.float64), np.asarray(count, np.float64)
  valid = count > 0
  if not np.any(valid):
    return float("nan")
  return float(np.mean(total[valid] / count[valid]))


def summarize(task: Task, totals) -> dict[str, float]:
  """Final metric values from accumulated ``{name: (sum, count)}`` totals."""
  if task.summarize_fn is not None:
    return task.summarize_fn(totals)
  return {name: ratio(*pair) for name, pair in totals.items()}
