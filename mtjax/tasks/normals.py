"""Surface normals: cosine loss on valid pixels; angle error statistics (Eigen & Fergus, 2015).

The median angle error is read from a histogram of 0.05° bins, so that it, too, is a sum
over pixels and stays exact under sharding (to within half a bin).
"""

import jax.numpy as jnp
import numpy as np

from mtjax.models.heads import DenseHead
from mtjax.tasks.base import Task, example_mask, masked_mean, ratio

BIN_DEGREES = 0.05
NUM_BINS = int(180 / BIN_DEGREES)
THRESHOLDS = (11.25, 22.5, 30.0)


def threshold_name(t: float) -> str:
  """``within_11_25``: the metric name of a threshold (no dots: config keys cannot hold them)."""
  return "within_" + f"{t:g}".replace(".", "_")


def _valid(batch):
  normals = batch["normals"]
  if "normals_valid" in batch:    # a dataset with its own normals mask (NYUv2)
    valid = batch["normals_valid"]
  elif "depth_valid" in batch:
    valid = batch["depth_valid"]
  else:
    valid = jnp.any(normals != 0, axis=-1)
  return valid.astype(jnp.float32) * example_mask(batch, "normals", normals.shape[0])[:, None, None]


def _unit(x):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def loss_fn(output, batch):
  """Mean of ``1 - cos(prediction, target)`` over valid pixels."""
  cos = jnp.sum(_unit(output) * batch["normals"], axis=-1)
  return masked_mean(1.0 - cos, _valid(batch))


def metrics_fn(output, batch):
  valid = _valid(batch)
  cos = jnp.clip(jnp.sum(_unit(output) * _unit(batch["normals"]), axis=-1), -1.0, 1.0)
  angle = jnp.degrees(jnp.arccos(cos))
  count = jnp.sum(valid)
  bins = jnp.clip((angle / BIN_DEGREES).astype(jnp.int32), 0, NUM_BINS - 1)
  hist = jnp.zeros((NUM_BINS,), jnp.float32).at[bins.reshape(-1)].add(valid.reshape(-1))
  metrics = {"mean_angle": (jnp.sum(angle * valid), count), "median_angle": (hist, count)}
  for t in THRESHOLDS:
    metrics[threshold_name(t)] = (jnp.sum((angle < t) * valid), count)
  return metrics


def summarize(totals):
  out = {name: ratio(*pair) for name, pair in totals.items() if name != "median_angle"}
  hist, count = (np.asarray(x, np.float64) for x in totals["median_angle"])
  if float(count) <= 0:
    out["median_angle"] = float("nan")
  else:
    idx = int(np.searchsorted(np.cumsum(hist), 0.5 * float(count)))
    out["median_angle"] = (idx + 0.5) * BIN_DEGREES
  for t in THRESHOLDS:
    out[threshold_name(t)] *= 100.0
  return out


def hflip(labels, **_):
  """Mirrored normals: the x component negated (camera x points right)."""
  normals = labels["normals"]
  return {"normals": normals * np.array([-1.0, 1.0, 1.0], normals.dtype)}


def predict_fn(output):
  return _unit(output)


def task() -> Task:
  return Task(
      name="normals",
      bilinear_keys=("normals",),
      augment={"hflip": hflip},
      head=lambda **kw: DenseHead(3, **kw),
      loss_fn=loss_fn,
      metrics_fn=metrics_fn,
      predict_fn=predict_fn,
      label_spec=lambda size: {"normals": ((*size, 3), jnp.float32),
                               "depth_valid": (tuple(size), jnp.bool_)},
      higher_is_better={"mean_angle": False, "median_angle": False,
                        **{threshold_name(t): True for t in THRESHOLDS}},
      summarize_fn=summarize,
  )
