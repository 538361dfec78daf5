"""Every sharing architecture × weighting methods × seeds, against single-task baselines.

    python experiments/sweep_architectures.py --config experiments/configs/architectures.py \
        --workdir workdirs/architectures --architectures all --methods ew,nash_mtl \
        --seeds 0,1,2 --out experiments/results/architectures [--config.num_steps=100 ...]

Per seed, each task is first trained alone with the same backbone, steps and seed (``hard``
with one task); then each architecture × method, with Δm% against the baselines of its seed.
Each configuration is compiled once and trained for every seed (:func:`_fits`: the numbers are
those of ``mtjax train`` with that seed, without its checkpoints and plots). The table reports
the metrics' mean over seeds, Δm% mean ± std (population std over the seeds), the parameter
count and the mean wall-clock seconds of a training step after the first (compilation).
Finished configurations are kept in ``<workdir>/runs.json``: rows of architectures added
later come with the same command, without retraining the others. Writes ``<out>.json`` and
``<out>.md``.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from mtjax import config as config_lib
from mtjax import models, weighting
from mtjax.data import pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402  (experiments/sweep.py: its flags, the config helper, write_table)

# --config, --workdir, --methods and --split are experiments/sweep.py's flags (defined on import).
_CONFIG, _WORKDIR, _SPLIT = sweep._CONFIG, sweep._WORKDIR, sweep._SPLIT  # noqa: SLF001
_METHODS = sweep._METHODS  # noqa: SLF001
flags.FLAGS.set_default("methods", "ew,nash_mtl")
_ARCHS = flags.DEFINE_string("architectures", "all", "Comma-separated architectures, or 'all'.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds.")
_OUT = flags.DEFINE_string("out", None, "Table path without extension (default: workdir/table).")
_with = sweep._with  # noqa: SLF001


def _model_cfg(cfg, architecture):
  common = {k: v for k, v in cfg.model.items() if k in ("backbone", *models.COMMON)}
  return config_lib.model_config(architecture, **common)


def _fits(cfg, seeds, split):
  """``{seed: (test metrics, seconds per step)}``: ``cfg`` trained once per seed.

  The pieces of ``mtjax train`` (``setup.build``, ``setup.make_trainer``, the same initial state
  ``trainer.init(PRNGKey(seed))``, the same batches ``pipeline.train_batch(seed, step)``, the
  same evaluation) without its checkpoints, logs and plots, and with one trainer (one
  compilation) for every seed: each seed's numbers are those of ``mtjax train`` with that seed.
  """
  import time

  import jax

  from mtjax.train import loop, setup
  from mtjax.train import step as step_lib

  mesh = step_lib.make_mesh()
  config_lib.validate(cfg, mesh.size)
  exp = setup.build(cfg)
  trainer = setup.make_trainer(cfg, exp, mesh)
  train_arrays = setup.load_data(cfg, "train", exp.label_keys)
  eval_arrays = setup.load_data(cfg, split, exp.label_keys)
  out = {}
  for seed in seeds:
    state = step_lib.replicate(trainer.init(jax.random.PRNGKey(seed)), mesh)
    start = None
    for step in range(cfg.num_steps):
      batch = pipeline.train_batch(train_arrays, seed=seed, step=step,
                                   batch_size=cfg.batch_size)
      state, step_metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
      if step == 0:
        jax.block_until_ready(state)
        start = time.perf_counter()
    jax.block_until_ready(state)
    step_time = (time.perf_counter() - start) / max(cfg.num_steps - 1, 1)
    if not np.isfinite(float(step_metrics["loss"])):
      raise RuntimeError(f"seed {seed}: non-finite loss")
    results = loop.evaluate_split(trainer.evaluate, state, eval_arrays, exp.tasks,
                                  cfg.eval_batch_size, mesh)
    out[seed] = (results, step_time)
    logging.warning("%s %s seed %d: %s, %.3f s/step", cfg.model.architecture,
                    cfg.weighting.name, seed, results, step_time)
  return out


def param_count(cfg, architecture) -> int:
  """The parameters of ``architecture`` on ``cfg`` (shapes only: nothing is computed)."""
  import jax
  import jax.numpy as jnp

  from mtjax import data
  from mtjax import tasks as tasks_lib

  info = data.dataset_info(cfg.dataset.name)
  tasks = {n: tasks_lib.get(n, **info["tasks"][n]) for n in cfg.tasks}
  model_cfg = _model_cfg(cfg, architecture)
  model = models.build(model_cfg.backbone, tasks,
                       **{k: v for k, v in model_cfg.items() if k != "backbone"})
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *cfg.dataset.image_size, 3)), train=False))
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"])))


def run(cfg, workdir, architectures, methods, seeds, split="test") -> dict:
  """Trains what ``workdir/runs.json`` does not hold yet; returns the table's data."""
  from mtjax import metrics
  from mtjax.train import setup

  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "runs.json")
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)

  def fits(key, run_cfg):
    if key not in done or any(str(s) not in done[key] for s in seeds):
      done[key] = {str(s): v for s, v in _fits(run_cfg, seeds, split).items()}
      with open(path, "w") as f:
        json.dump(done, f, indent=2)
    return {s: done[key][str(s)] for s in seeds}

  baselines = {s: {} for s in seeds}
  for task in cfg.tasks:
    stl = _with(cfg, tasks=(task,), model=_model_cfg(cfg, "hard"),
                weighting=config_lib.weighting_config("ew"), baselines={})
    for seed, (results, _) in fits(f"stl_{task}", stl).items():
      baselines[seed][task] = results[task]
  tasks = setup.build(cfg).tasks
  rows = []
  for architecture in architectures:
    params = param_count(cfg, architecture)
    for method in methods:
      run_cfg = _with(cfg, model=_model_cfg(cfg, architecture),
                      weighting=config_lib.weighting_config(method))
      runs = [{"seed": seed, "metrics": results, "step_time": step_time,
               "delta_m": metrics.delta_m(tasks, results, baselines[seed])}
              for seed, (results, step_time) in fits(f"{architecture}_{method}",
                                                     run_cfg).items()]
      rows.append({"architecture": architecture, "method": method, "params": params,
                   "runs": runs})
  return {"split": split, "num_steps": cfg.num_steps, "seeds": list(seeds),
          "baselines": baselines, "rows": rows}


def format_table(result) -> str:
  """A Markdown table: one row per architecture × method, means over seeds."""
  first = next(iter(result["baselines"].values()))
  columns = [(task, metric) for task, values in first.items() for metric in values]
  header = (["architecture", "method", "params"] + [f"{t} {m}" for t, m in columns]
            + ["Δm% ↓ (mean ± std)", "s/step"])
  lines = [f"{result['split']} split, {result['num_steps']} steps, seeds {result['seeds']}; "
           "metrics: mean over seeds", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  base = [np.mean([b[t][m] for b in result["baselines"].values()]) for t, m in columns]
  lines.append("| single-task (hard, one task) | ew | — | "
               + " | ".join(f"{v:.4f}" for v in base) + " | 0 | — |")
  for row in result["rows"]:
    runs = row["runs"]
    cells = [f"{np.mean([r['metrics'][t][m] for r in runs]):.4f}" for t, m in columns]
    deltas = [r["delta_m"] for r in runs]
    lines.append(f"| {row['architecture']} | {row['method']} | {row['params']:,} | "
                 + " | ".join(cells)
                 + f" | {np.mean(deltas):+.2f} ± {np.std(deltas):.2f} | "
                 + f"{np.mean([r['step_time'] for r in runs]):.3f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  # "all": the architectures over the config's ResNet backbone (SegNet-MTAN brings its own
  # encoder and runs with backbone "segnet": experiments/configs/nyuv2_segnet_mtan.py).
  architectures = ([n for n in models.names() if n != "segnet_mtan"] if _ARCHS.value == "all"
                   else _ARCHS.value.split(","))
  for name in architectures:
    models.hparams(name)  # fail early on a bad name
  methods = weighting.names() if _METHODS.value == "all" else _METHODS.value.split(",")
  for name in methods:
    weighting.get(name)  # fail early on a bad name
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  result = run(_CONFIG.value, _WORKDIR.value, architectures, methods, seeds, _SPLIT.value)
  print(sweep.write_table(result, _OUT.value or os.path.join(_WORKDIR.value, "table"),
                          format_table))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
