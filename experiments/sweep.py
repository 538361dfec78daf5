"""Runs every weighting method (and the single-task baselines) on one config; writes a table.

    python experiments/sweep.py --config experiments/configs/shapes.py --workdir workdirs/sweep \
        [--methods ew,pcgrad,...] [--baselines_from OLD/sweep.json] [--config.num_steps=400 ...]

First each task is trained alone with the same model, steps and seed (the single-task
baselines, ``stl_<task>/``); then each method in ``<method>/``, with Δm% against those
baselines on the same split. Runs resume from their checkpoints, so an interrupted sweep picks
up where it stopped. Writes ``sweep.md`` and ``sweep.json`` in the workdir. ``--baselines_from``
takes the baselines of an earlier ``sweep.json`` (same config and split) instead of training
them, to add rows to its table.
"""

import copy
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from mtjax import config as config_lib
from mtjax import weighting

_CONFIG = config_flags.DEFINE_config_file("config", None, "The experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.")
_METHODS = flags.DEFINE_string("methods", "all", "Comma-separated method names, or 'all'.")
_SPLIT = flags.DEFINE_string("split", "test", "The split the table reports.")
_BASELINES_FROM = flags.DEFINE_string(
    "baselines_from", None, "An earlier sweep.json whose baselines to use instead of training.")


def _with(cfg, **fields):
  cfg = copy.deepcopy(cfg)
  with cfg.unlocked():
    for key, value in fields.items():
      cfg[key] = value
  return cfg


def run_sweep(cfg, workdir: str, methods, split: str = "test", progress: bool = False,
              baselines=None) -> dict:
  """Trains the baselines (unless given) and ``methods``; returns ``{"baselines": ...,
  "runs": ...}``."""
  from mtjax.train import loop

  given = baselines is not None
  baselines = dict(baselines or {})
  for task in () if given else cfg.tasks:
    stl = _with(cfg, tasks=(task,), weighting=config_lib.weighting_config("ew"), baselines={})
    out = loop.train(stl, os.path.join(workdir, f"stl_{task}"), progress=progress)
    baselines[task] = out[split]["metrics"][task]
  runs = {}
  for name in methods:
    run_cfg = _with(cfg, weighting=config_lib.weighting_config(name), baselines=baselines)
    out = loop.train(run_cfg, os.path.join(workdir, name), progress=progress)
    runs[name] = {"level": weighting.get(name).level, **out[split]}
  result = {"split": split, "grad_level": cfg.grad_level, "num_steps": cfg.num_steps,
            "seed": cfg.seed, "baselines": baselines, "runs": runs}
  write_table(result, os.path.join(workdir, "sweep"), format_sweep)
  return result


def write_table(result: dict, path: str, format_fn) -> str:
  """Writes ``result`` to ``<path>.json`` and its Markdown table ``format_fn(result)`` to
  ``<path>.md``; returns the table. What every sweep script ends with."""
  table = format_fn(result)
  with open(path + ".json", "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  with open(path + ".md", "w") as f:
    f.write(table + "\n")
  return table


def format_sweep(result) -> str:
  """A Markdown table: one row per method (and the baselines), the metrics, Δm%."""
  baselines = result["baselines"]
  columns = [(task, metric) for task, values in baselines.items() for metric in values]
  header = ["method", "level"] + [f"{t} {m}" for t, m in columns] + ["Δm% ↓"]
  lines = [f"{result['split']} split, {result['num_steps']} steps, seed {result['seed']}, "
           f"gradient methods at the {result['grad_level']} level", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines.append("| single-task baselines | — | "
               + " | ".join(f"{baselines[t][m]:.4f}" for t, m in columns) + " | 0 |")
  for name, run in sorted(result["runs"].items(), key=lambda kv: kv[1]["delta_m"]):
    cells = [f"{run['metrics'][t][m]:.4f}" for t, m in columns]
    lines.append(f"| {name} | {run['level']} | " + " | ".join(cells)
                 + f" | {run['delta_m']:+.2f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  methods = weighting.names() if _METHODS.value == "all" else _METHODS.value.split(",")
  for name in methods:
    weighting.get(name)  # fail early on a bad name
  baselines = None
  if _BASELINES_FROM.value:
    with open(_BASELINES_FROM.value) as f:
      earlier = json.load(f)
    if earlier["split"] != _SPLIT.value or earlier["num_steps"] != _CONFIG.value.num_steps:
      raise app.UsageError(f"--baselines_from: {_BASELINES_FROM.value} is split "
                           f"{earlier['split']!r}, {earlier['num_steps']} steps; this sweep is "
                           f"{_SPLIT.value!r}, {_CONFIG.value.num_steps} steps")
    baselines = earlier["baselines"]
  result = run_sweep(_CONFIG.value, _WORKDIR.value, methods, _SPLIT.value, baselines=baselines)
  print(format_sweep(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
