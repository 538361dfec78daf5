"""The task contract: pure loss, metric and prediction functions, looked up by name.

``loss_fn(output, batch) -> scalar``; ``metrics_fn(output, batch) -> {name: (sum, count)}``, sums
and counts that stay exact under padding, masking and device sharding; ``predict_fn(output)``.
A batch may carry ``mask`` (B,) for padded examples and ``<task>_mask`` (B,) for examples whose
label for this task is missing: losses and metrics skip them.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Task(NamedTuple):
  """One task: its head, its label keys and its pure functions."""

  name: str
  head: str  # "dense" or "classification"
  loss_fn: Callable
  metrics_fn: Callable
  predict_fn: Callable
  label_keys: tuple[str, ...]
  # Metric name -> True where higher is better; these are the metrics Δm% averages over.
  higher_is_better: Mapping[str, bool]
  summarize_fn: Callable | None = None  # totals -> {metric: float}; default sum / count


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
