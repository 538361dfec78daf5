"""Compares the optimisation strategies (config.strategy) over seeds; writes a table.

    python experiments/strategies.py --config experiments/configs/shapes.py \
        --workdir workdirs/strategies --seeds 0,1,2 [--config.num_steps=150 ...]

The single-task baselines come from :func:`experiments.sweep.run_sweep` (no methods: only the
``stl_<task>/`` runs, seed ``config.seed``); each strategy then trains once per seed in
``<strategy>_seed<s>/`` with Δm% against those baselines (``mtjax.metrics.delta_m``, as in the
sweep). The first strategy's first seed also logs TAG's affinity when
``config.relations.affinity_every`` is set (it does not change the trajectory). Writes
``strategies.md`` and ``strategies.json`` in the workdir.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402  (experiments/sweep.py: the baselines and the config helper)

# --config, --workdir and --split are experiments/sweep.py's flags (defined on import).
_CONFIG, _WORKDIR, _SPLIT = sweep._CONFIG, sweep._WORKDIR, sweep._SPLIT  # noqa: SLF001
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_STRATEGIES = flags.DEFINE_string("strategies", "end_to_end,alternating,progressive",
                                  "Comma-separated strategies.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Train nothing: assemble the table from the "
                             "finished runs' results.json in the workdir.")


def run(cfg, workdir, strategies, seeds, split="test") -> dict:
  from mtjax.train import loop

  affinity_every = cfg.relations.affinity_every
  cfg = sweep._with(cfg, relations={**cfg.relations.to_dict(), "affinity_every": 0})  # noqa: SLF001
  baselines = sweep.run_sweep(cfg, workdir, [], split)["baselines"]
  runs = {}
  for strategy in strategies:
    for seed in seeds:
      run_cfg = sweep._with(cfg, strategy=strategy, seed=seed, baselines=baselines)  # noqa: SLF001
      if (strategy, seed) == (strategies[0], seeds[0]):
        run_cfg = sweep._with(run_cfg, relations={**cfg.relations.to_dict(),  # noqa: SLF001
                                                  "affinity_every": affinity_every})
      out = loop.train(run_cfg, os.path.join(workdir, f"{strategy}_seed{seed}"), progress=False)
      runs.setdefault(strategy, {})[seed] = {"delta_m": out[split]["delta_m"],
                                             "metrics": out[split]["metrics"]}
  result = {"split": split, "num_steps": cfg.num_steps, "seeds": list(seeds),
            "baseline_seed": cfg.seed, "phases": cfg.phases.to_dict(),
            "baselines": baselines, "runs": runs}
  sweep.write_table(result, os.path.join(workdir, "strategies"), format_table)
  return result


def collect(cfg, workdir, strategies, seeds, split="test") -> dict:
  """The table's data from finished runs in ``workdir`` (``sweep.json`` for the baselines)."""
  with open(os.path.join(workdir, "sweep.json")) as f:
    baselines = json.load(f)["baselines"]
  runs = {}
  for strategy in strategies:
    for seed in seeds:
      with open(os.path.join(workdir, f"{strategy}_seed{seed}", "results.json")) as f:
        out = json.load(f)
      runs.setdefault(strategy, {})[seed] = {"delta_m": out[split]["delta_m"],
                                             "metrics": out[split]["metrics"]}
  return {"split": split, "num_steps": cfg.num_steps, "seeds": list(seeds),
          "baseline_seed": cfg.seed, "phases": cfg.phases.to_dict(), "baselines": baselines,
          "runs": runs}


def format_table(result) -> str:
  """One row per strategy: each main metric and Δm%, mean ± std over the seeds."""
  main = {"segmentation": "miou", "depth": "abs_err", "normals": "mean_angle",
          "classification": "accuracy"}
  tasks = [t for t in result["baselines"] if t in main]
  header = ["strategy"] + [f"{t} {main[t]}" for t in tasks] + ["Δm% ↓ (mean ± std)"]
  lines = [f"{result['split']} split, {result['num_steps']} steps, seeds {result['seeds']} "
           f"(single-task baselines: seed {result['baseline_seed']}); phases "
           f"{result['phases']}", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines.append("| single-task baselines | " + " | ".join(
      f"{result['baselines'][t][main[t]]:.4f}" for t in tasks) + " | 0 |")
  for strategy, seeds in result["runs"].items():
    runs = list(seeds.values())
    cells = []
    for t in tasks:
      v = np.array([r["metrics"][t][main[t]] for r in runs])
      cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
    d = np.array([r["delta_m"] for r in runs])
    lines.append(f"| {strategy} | " + " | ".join(cells)
                 + f" | {d.mean():+.2f} ± {d.std(ddof=1) if len(d) > 1 else 0:.2f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  strategies = _STRATEGIES.value.split(",")
  if _COLLECT.value:
    result = collect(_CONFIG.value, _WORKDIR.value, strategies, seeds, _SPLIT.value)
    sweep.write_table(result, os.path.join(_WORKDIR.value, "strategies"), format_table)
  else:
    result = run(_CONFIG.value, _WORKDIR.value, strategies, seeds, _SPLIT.value)
  print(format_table(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
