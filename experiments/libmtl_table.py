"""LibMTL-style results of protocol runs: the best epoch and the mean of the last 10, with Δp.

    python experiments/libmtl_table.py workdirs/nyuv2_ew \
        --single-task workdirs/nyuv2_stl_seg workdirs/nyuv2_stl_depth workdirs/nyuv2_stl_normals

Reads each run's ``metrics.jsonl`` (one validation record per epoch with the protocol configs,
``eval_every`` = one epoch) and prints a Markdown table:

* **best epoch**, LibMTL's rule (``LibMTL/_record.py``, ``_update_best_result``): the epoch
  whose results improve most on the *first* epoch's, by LibMTL's improvement
  (``LibMTL/utils.py``, ``count_improvement``);
* **mean of the last 10 epochs** (MTAN, Nash-MTL, FAMO report this);
* **Δp** of each row against the single-task runs' best epochs (DB-MTL 2023, Eq. in §5; LibMTL's
  ``count_improvement`` × 100): ``100 / T Σ_t 1 / M_t Σ_m (−1)^{w_m} (B_m − N_m) / B_m`` with
  ``w_m = 1`` where higher is better — positive is better, and every task weighs the same
  whatever its number of metrics (mtjax's ``Δm%`` averages over metrics and has the opposite
  sign).
"""

import argparse
import json
import math
import os

import numpy as np

from mtjax import tasks as tasks_lib


def read_epochs(run_dir: str) -> list[dict]:
  """``[{task: {metric: value}}, ...]``: the run's validation evaluations, in order."""
  out = []
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line) if line.strip() else {}
      if record.get("split") != "validation":
        continue
      results = {}
      for key, value in record.items():
        if key.startswith("validation/"):
          _, task, metric = key.split("/", 2)
          results.setdefault(task, {})[metric] = value
      out.append(results)
  return out


def higher_is_better(task: str) -> dict:
  """``{metric: bool}`` of mtjax's task ``task`` (its class count does not matter here)."""
  options = {"num_classes": 2} if task == "segmentation" else {}
  return dict(tasks_lib.get(task, **options).higher_is_better)


def improvement(base: dict, new: dict) -> float:
  """LibMTL's ``count_improvement(base, new, weight)`` × 100 over the tasks and metrics of
  ``base`` (positive: ``new`` is better)."""
  per_task = []
  for task, metrics in base.items():
    better = higher_is_better(task)
    terms = [(-1.0) ** better[m] * (metrics[m] - new[task][m]) / metrics[m] for m in metrics
             if m in better]
    per_task.append(np.mean(terms))
  return 100.0 * float(np.mean(per_task)) if per_task else math.nan


def best_epoch(epochs: list[dict]) -> int:
  """LibMTL's best epoch: the largest improvement on epoch 0's results (the first wins ties)."""
  scores = [improvement(epochs[0], e) for e in epochs]
  return int(np.argmax(scores))


def mean_of_last(epochs: list[dict], n: int = 10) -> dict:
  last = epochs[-n:]
  return {t: {m: float(np.mean([e[t][m] for e in last])) for m in last[0][t]} for t in last[0]}


def table(run_dir: str, single_task=(), last: int = 10) -> str:
  epochs = read_epochs(run_dir)
  if not epochs:
    raise SystemExit(f"{run_dir}/metrics.jsonl has no validation record (eval_every > 0?)")
  baseline = {}
  for stl in single_task:
    stl_epochs = read_epochs(stl)
    baseline.update(stl_epochs[best_epoch(stl_epochs)])
  best = best_epoch(epochs)
  rows = [(f"best epoch ({best + 1} of {len(epochs)})", epochs[best]),
          (f"mean of the last {min(last, len(epochs))}", mean_of_last(epochs, last))]
  if baseline:
    rows.insert(0, ("single-task (best epochs)", baseline))
  columns = [(t, m) for t in epochs[0] for m in epochs[0][t]]
  head = "| | " + " | ".join(f"{t} {m}" for t, m in columns) + " | Δp |"
  lines = [head, "|" + "---|" * (len(columns) + 2)]
  for name, results in rows:
    delta = improvement({t: baseline[t] for t in results if t in baseline}, results) \
        if baseline else math.nan
    cells = " | ".join(f"{results[t][m]:.4f}" for t, m in columns)
    lines.append(f"| {name} | {cells} | {delta:+.2f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir")
  parser.add_argument("--single-task", nargs="*", default=(),
                      help="workdirs of single-task runs (their best epochs are the baseline)")
  parser.add_argument("--last", type=int, default=10)
  args = parser.parse_args(argv)
  text = table(args.run_dir, args.single_task, args.last)
  print(text)
  return text


if __name__ == "__main__":
  main()
