"""Many tasks: step time and memory of EW, the representation level and the parameter level
with and without chunks of tasks (``config.task_chunk``), at T = 3, 10, 40.

    PYTHONPATH=. python benchmarks/many_tasks.py --out benchmarks/results/many_tasks_cpu

The setups and helpers are those of ``benchmarks/step_time.py`` (tasks beyond 3 are depth copies
with their own heads). For each T and row the step is compiled ahead of time
(``jax.jit(step).lower(...).compile()``; its compile seconds include tracing), and memory is
XLA's compiled memory analysis of that step: ``temp`` (the buffers the step allocates: its peak
working set beyond its inputs and outputs) and ``args`` (state and batch). It is what XLA
plans, on any backend (``memory_stats()`` has no per-step peak on CPU). The step time is the
median of ``--steps`` steps after ``--warmup``, each ended by ``jax.block_until_ready``; the ratio
is to EW at the same T.
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import step_time
from mtjax import weighting
from mtjax.train import step as step_lib


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", choices=sorted(step_time.SETUPS), default="tiny")
  p.add_argument("--num-tasks", default="3,10,40", help="comma-separated T values")
  p.add_argument("--method", default="mgda", help="a gradient-level method with from_gram")
  p.add_argument("--task-chunk", type=int, default=8)
  p.add_argument("--image-size", default=None, help="H or HxW (default: the setup's)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default=None, help="output path prefix: PREFIX.json and PREFIX.md")
  return p.parse_args(argv)


def rows_of(method, chunk):
  """(label, method, level, task_chunk) of one T."""
  return [("EW", "ew", "parameter", 0),
          (f"{method}, representation", method, "representation", 0),
          (f"{method}, parameter", method, "parameter", 0),
          (f"{method}, parameter, chunk {chunk}", method, "parameter", chunk)]


def measure(cfg, model, tasks, optimizer, base, batch, mesh, name, level, chunk):
  method = weighting.get(name)
  state = step_time.fresh_state(base, model, method, len(tasks), level, cfg)
  state = jax.block_until_ready(step_lib.replicate(state, mesh))
  trainer = step_time.make_trainer(model, tasks, method, optimizer, level, cfg, mesh, chunk)
  start = time.perf_counter()
  compiled = jax.jit(lambda s, b: trainer.step(s, b), donate_argnums=(0,)).lower(
      state, batch).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  for _ in range(cfg["warmup"]):
    state, _ = jax.block_until_ready(compiled(state, batch))
  times = []
  for _ in range(cfg["steps"]):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, batch))
    times.append(1e3 * (time.perf_counter() - start))
  return {"median_ms": statistics.median(times), "times_ms": times, "compile_s": compile_s,
          "temp_mib": mem.temp_size_in_bytes / 2**20,
          "args_mib": mem.argument_size_in_bytes / 2**20}


def markdown(info, rows):
  lines = [f"# Many tasks: step time and compiled memory ({info['setup']})", "",
           f"- device: {info['device_kind']} ({info['backend']}), jax {info['jax']}",
           f"- {info['backbone']}, head hidden {info['head_hidden']}, batch {info['batch']} of "
           f"{info['image_size'][0]}×{info['image_size'][1]}, {info['dtype']}; median of "
           f"{info['steps']} steps after {info['warmup']} warm-up",
           f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']}",
           f"- date: {info['date']}", "",
           "| T | run | median ms | ratio to EW | XLA temp MiB | args MiB | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['T']} | {r['label']} | error: {r['error'][:80]} | — | — | — | — |")
      continue
    lines.append(f"| {r['T']} | {r['label']} | {r['median_ms']:.1f} | {r['ratio']:.2f} | "
                 f"{r['temp_mib']:.1f} | {r['args_mib']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  method = weighting.get(args.method)
  if method.from_gram is None:
    raise ValueError(f"--method {args.method!r} has no from_gram: chunks need one")
  mesh = step_lib.make_mesh()
  info, rows = None, []
  load_before = os.getloadavg()[0]
  for num_tasks in [int(t) for t in args.num_tasks.split(",")]:
    flags = ["--setup", args.setup, "--num-tasks", str(num_tasks), "--warmup", str(args.warmup),
             "--steps", str(args.steps)]
    flags += ["--image-size", args.image_size] if args.image_size else []
    flags += ["--batch", str(args.batch)] if args.batch else []
    st_args = step_time.parse_args(flags)
    cfg = step_time.resolve(st_args)
    if info is None:
      info = step_time.header(st_args, cfg, mesh)
    model, tasks, optimizer = step_time.build_setup(cfg)
    rng = np.random.default_rng(0)
    batch = step_lib.shard_batch(step_time.synthetic_batch(rng, cfg["batch"], cfg["image_size"],
                                                           cfg["num_classes"]), mesh)
    base = step_time.base_state(model, tasks, optimizer, cfg)
    ew_ms = None
    for label, name, level, chunk in rows_of(args.method, args.task_chunk):
      row = {"T": num_tasks, "label": label, "method": name, "level": level, "task_chunk": chunk}
      try:
        row.update(measure(cfg, model, tasks, optimizer, base, batch, mesh, name, level, chunk))
      except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported in the table
        row["error"] = f"{type(e).__name__}: {e}"
      finally:
        jax.clear_caches()
        gc.collect()
      if name == "ew" and "median_ms" in row:
        ew_ms = row["median_ms"]
      if "median_ms" in row:
        row["ratio"] = row["median_ms"] / ew_ms if ew_ms else float("nan")
      rows.append(row)
      print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
  info.pop("num_tasks", None)
  info.update(load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2),
              num_tasks=args.num_tasks, method=args.method, task_chunk=args.task_chunk,
              date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
  result = {"info": info, "rows": rows}
  table = markdown(info, rows)
  print(table, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(table)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
