"""Accumulating per-task metrics and the multi-task summary Δm%.

Metrics are ``(sum, count)`` pairs; accumulating them in float64 on the host keeps evaluation
exact under padding, masking and sharding.
"""

import math

import jax
import numpy as np

from mtjax import tasks as tasks_lib


def accumulate(totals, batch_metrics):
  """``totals + batch_metrics``, leaf by leaf, in float64 (``totals`` may be None)."""
  batch_metrics = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), batch_metrics)
  if totals is None:
    return batch_metrics
  return jax.tree_util.tree_map(np.add, totals, batch_metrics)


def summarize(tasks, totals) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` from accumulated totals."""
  return {name: tasks_lib.summarize(task, totals[name]) for name, task in tasks.items()}


def delta_m(tasks, results, baselines) -> float:
  """Δm% (Maninis et al., 2019; Liu et al., 2022), averaged over the K metrics with a baseline.

  Δm% = (100 / K) Σ_k (−1)^{δ_k} (M_k − B_k) / B_k, with δ_k = 1 where higher is better: lower
  is better, 0 means on par with the single-task baselines. Metrics without a baseline, or with
  a zero one (the ratio is undefined), are left out; NaN where none is left.
  """
  terms = []
  for name, task in tasks.items():
    for metric, higher_is_better in task.higher_is_better.items():
      base = (baselines.get(name) or {}).get(metric)
      if not base or metric not in results.get(name, {}):  # no (or a zero) baseline
        continue
      sign = -1.0 if higher_is_better else 1.0
      terms.append(sign * (results[name][metric] - base) / base)
  return 100.0 * float(np.mean(terms)) if terms else math.nan


def format_table(results, delta=None, title="") -> str:
  """A Markdown table: one row per task, its metrics, and Δm% if given."""
  lines = [f"### {title}", ""] if title else []
  lines += ["| task | metric | value |", "|---|---|---|"]
  for name, values in results.items():
    for metric, value in values.items():
      lines.append(f"| {name} | {metric} | {value:.4f} |")
  if delta is not None:
    lines.append(f"| all | Δm% (vs single-task baselines) | {delta:+.2f} |")
  return "\n".join(lines)
