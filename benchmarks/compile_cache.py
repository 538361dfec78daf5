"""The persistent compilation cache across runs: the same config trained twice, compile time.

    PYTHONPATH=. python benchmarks/compile_cache.py --out benchmarks/results/compile_cache_cpu

Runs ``mtjax train`` on the default experiment (shortened: ``--steps`` steps, small splits, an
evaluation at the end) twice in two fresh processes, each in a new workdir, both with
``config.compilation_cache`` pointing at one new, empty folder. The first run compiles and
writes the cache, the second reads it. Reported per run: the seconds XLA spent compiling (the
sum of JAX's ``/jax/core/compile/backend_compile_duration`` events: executables compiled, not
loaded), the compilations counted, the cache's hits and the process's wall time.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile

from benchmarks.gpu_smoke import cli_run
from benchmarks.step_time import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIT = "/jax/compilation_cache/cache_retrieval_time_sec"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--config", default="experiments/configs/shapes.py")
  p.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  base = tempfile.mkdtemp(prefix="mtjax-cache-bench-")
  cache = os.path.join(base, "cache")
  env = {**os.environ, "MTJAX_DATA_DIR": os.environ.get("MTJAX_DATA_DIR",
                                                        os.path.join(base, "data")),
         "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = ["--config", args.config, f"--config.compilation_cache={cache}",
           f"--config.num_steps={args.steps}", f"--config.log_every={args.steps}",
           "--config.eval_every=0", "--config.checkpoint_every=0",
           "--config.dataset.split_sizes.train=256", "--config.dataset.split_sizes.validation=64",
           "--config.dataset.split_sizes.test=64"]
  rows = []
  for i in (1, 2):
    stats, wall = cli_run(flags, os.path.join(base, f"run{i}"),
                          os.path.join(base, f"run{i}.json"), env)
    rows.append({"run": i, "compile_s": stats["compile_s"], "compiles": stats["compiles"],
                 "cache_hits": stats["counts"].get(HIT, 0),
                 "retrieval_s": stats["durations"].get(HIT, 0.0), "wall_s": wall})
    print(json.dumps(rows[-1]), flush=True)
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": args.config, "steps": args.steps, "cpus": os.cpu_count(), "rows": rows}
  lines = [f"`mtjax train --config {args.config}` ({args.steps} steps) twice with one "
           f"persistent compilation cache, {os.cpu_count()} CPUs, {result['date']}", "",
           "| run | XLA compile (s) | compilations | cache hits | cache reads (s) | wall (s) |",
           "|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['compile_s']:.1f} | {r['compiles']} | {r['cache_hits']} "
                 f"| {r['retrieval_s']:.1f} | {r['wall_s']:.1f} |")
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_result(args.out, result, text + "\n")
  return result


if __name__ == "__main__":
  main()
  sys.exit(0)
