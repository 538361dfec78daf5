"""What gradient-conflict logging costs a logging step of an experiment (default: the default one).

    PYTHONPATH=. python benchmarks/conflict_cost.py --out benchmarks/results/conflict_cost_cpu

The experiment of ``--config`` (``experiments/configs/shapes.py``: equal weighting, a loss-level
method) is built as ``mtjax train`` builds it (``setup.build``, ``setup.make_trainer``), once per
setting of ``config.relations``: conflict off; on at the ``auto`` level (a loss-level method on
an encoder model: the shared representation); on at the ``parameter`` level (the per-task
gradients of every shared parameter, the default before). For each, the step is compiled (the
first call, timed on its own), then single steps are timed in pairs, each ended by
``jax.block_until_ready``: one at a step that does not log (``state.step = log_every - 2``) and
one at a logging step (``log_every - 1``: the ``lax.cond`` takes the conflict branch). The table
gives the medians and the extra time of a logging step. Synthetic batches with the shapes and
dtypes of the config's (``benchmarks.step_time.synthetic_batch``; no dataset is built).
"""

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_time import synthetic_batch, write_result
from mtjax import data
from mtjax.train import setup
from mtjax.train import step as step_lib

SETTINGS = {"off": (False, "auto"), "auto": (True, "auto"), "parameter": (True, "parameter")}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/configs/shapes.py")
  p.add_argument("--method", default=None, help="the weighting method (default: the config's)")
  p.add_argument("--settings", default="off,auto,parameter",
                 help=f"comma-separated, some of {sorted(SETTINGS)}")
  p.add_argument("--pairs", type=int, default=10, help="timed (non-logging, logging) pairs")
  p.add_argument("--parameter-pairs", type=int, default=3,
                 help="pairs for the parameter level (its logging step is slow on CPU)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="", help="PREFIX: writes PREFIX.json and PREFIX.md")
  return p.parse_args(argv)


def load_config(path, method):
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(method)


def time_setting(cfg, exp, mesh, batch, setting, pairs, warmup):
  """``(compile s, [ms of non-logging steps], [ms of logging steps], conflict level)``."""
  conflict, level = SETTINGS[setting]
  cfg = cfg.copy_and_resolve_references()
  cfg.relations.conflict = conflict
  cfg.relations.conflict_level = level
  trainer = setup.make_trainer(cfg, exp, mesh)
  state = trainer.init(jax.random.PRNGKey(cfg.seed))

  def step_at(state, k):
    state = state._replace(step=jnp.asarray(k, jnp.int32))
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(trainer.step(state, batch, phase=trainer.phase(k)))
    return state, metrics, 1e3 * (time.perf_counter() - start)

  plain, logging = cfg.log_every - 2, cfg.log_every - 1
  start = time.perf_counter()
  state, _, _ = step_at(state, plain)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, _, _ = step_at(state, plain)
    state, _, _ = step_at(state, logging)
  off, on = [], []
  for _ in range(pairs):
    state, _, ms = step_at(state, plain)
    off.append(ms)
    state, metrics, ms = step_at(state, logging)
    on.append(ms)
  if conflict:  # the logging step did take the conflict branch
    assert float(np.asarray(metrics["conflict/cosine"])[0, 0]) == 1.0, "conflict not measured"
  return compile_s, off, on, trainer.conflict_level


def markdown(info, rows):
  lines = [
      "# The cost of gradient-conflict logging per logging step", "",
      f"- config: `{info['config']}`, method `{info['method']}`, batch {info['batch_size']} of "
      f"{info['image_size'][0]}×{info['image_size'][1]}, log every {info['log_every']} steps",
      f"- device: {info['device_kind']} × {info['num_devices']} ({info['backend']}), "
      f"jax {info['jax']}",
      f"- load average before / after: {info['load_before']} / {info['load_after']} "
      f"({info['cpus']} CPUs)",
      f"- date: {info['date']}", "",
      "| conflict | level | step ms (median) | logging step ms (median) | extra per logging "
      "step ms | pairs | compile s |",
      "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['level'] or '—'} | {r['step_ms']:.1f} | "
                 f"{r['logging_step_ms']:.1f} | {r['extra_ms']:+.1f} | {r['pairs']} | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  settings = [s.strip() for s in args.settings.split(",") if s.strip()]
  for s in settings:
    if s not in SETTINGS:
      raise ValueError(f"--settings: got {s!r}; expected some of {sorted(SETTINGS)}")
  cfg = load_config(args.config, args.method)
  mesh = setup.make_mesh(cfg)
  exp = setup.build(cfg)
  classes = data.dataset_info(cfg.dataset.name)["tasks"].get("segmentation", {}).get(
      "num_classes", 2)
  batch = step_lib.shard_batch(synthetic_batch(np.random.default_rng(0), cfg.batch_size,
                                               tuple(cfg.dataset.image_size), classes), mesh)
  info = {"config": args.config, "method": cfg.weighting.name, "batch_size": cfg.batch_size,
          "image_size": list(cfg.dataset.image_size), "log_every": cfg.log_every,
          "device_kind": jax.devices()[0].device_kind, "num_devices": mesh.size,
          "backend": jax.default_backend(), "jax": jax.__version__, "cpus": os.cpu_count(),
          "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  print(json.dumps(info), flush=True)
  rows = []
  for setting in settings:
    pairs = args.parameter_pairs if setting == "parameter" else args.pairs
    compile_s, off, on, level = time_setting(cfg, exp, mesh, batch, setting, pairs, args.warmup)
    row = {"setting": setting, "level": level, "compile_s": compile_s, "pairs": pairs,
           "step_ms": statistics.median(off), "logging_step_ms": statistics.median(on),
           "extra_ms": statistics.median(on) - statistics.median(off),
           "step_times_ms": off, "logging_step_times_ms": on}
    rows.append(row)
    print(f"{setting:10s} level {level}: step {row['step_ms']:.1f} ms, logging step "
          f"{row['logging_step_ms']:.1f} ms, compile {compile_s:.1f} s", flush=True)
    jax.clear_caches()
  info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
  result = {"info": info, "rows": rows}
  table = markdown(info, rows)
  print(table, flush=True)
  if args.out:
    write_result(args.out, result, table)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
