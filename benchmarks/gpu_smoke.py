"""The five-minute device check (``bash benchmarks/gpu.sh smoke``): one table of first-run facts.

    PYTHONPATH=. python benchmarks/gpu_smoke.py --out benchmarks/results/gpu/smoke
    PYTHONPATH=. python benchmarks/gpu_smoke.py --dry --out /tmp/gpu_dry/smoke   # any CPU

Rows:
  * ``default ×2``: the default experiment (``experiments/configs/shapes.py``, shortened: fewer
    steps, smaller splits) run twice by ``mtjax train`` in two fresh processes with
    ``config.deterministic`` on; its ``metrics.jsonl`` (every field but ``steps_per_sec``) and
    the final metrics of ``results.json`` compared bit for bit;
  * ``det_seg 512``: ``experiments/configs/det_seg.py:gpu,ew`` (ResNet-50 + FCOS + segmentation
    at 512×512, bfloat16) for a few dozen steps on a small split rendered on the fly;
  * ``nyuv2 <method>``: the NYUv2 protocol's step (``experiments/configs/nyuv2.py``'s model,
    288×384, batch 8) on random arrays: ew, pcgrad and upgrad at the parameter level, mgda at
    the representation level.
Columns: compile seconds (CLI rows: every XLA compilation of the run, from JAX's
``/jax/core/compile/backend_compile_duration`` events; step rows: the first step's trace,
compilation and run), the median step time, the device's peak memory in use
(``Device.memory_stats()["peak_bytes_in_use"]``: the process's peak so far, so a step row shows
the largest of the rows before it too; absent on a CPU) and XLA's compiled estimate of the step
(arguments + outputs − aliased + temporaries, :mod:`benchmarks.memory_plan`).

``--dry``: the same checks at a tiny size (16×16 default experiment, resnet_tiny det_seg at
32×32, a tiny NYUv2 model) on any machine, in about a minute: CI runs it.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import memory_plan
from benchmarks.step_time import write_result
from mtjax import weighting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NYU_METHODS = (("ew", "parameter"), ("pcgrad", "parameter"), ("upgrad", "parameter"),
               ("mgda", "representation"))

# A `mtjax train` process that also reports its compile seconds and the device's peak memory.
BOOT = """
import atexit, collections, json, os, sys
import jax
durations, counts = collections.defaultdict(float), collections.Counter()
def on_duration(event, seconds, **kwargs):
  durations[event] += seconds
  counts[event] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
def report():
  stats = jax.devices()[0].memory_stats() or {}
  compile_event = "/jax/core/compile/backend_compile_duration"
  with open(os.environ["MTJAX_SMOKE_STATS"], "w") as f:
    json.dump({"compile_s": durations[compile_event], "compiles": counts[compile_event],
               "durations": durations, "counts": counts,
               "peak_bytes": stats.get("peak_bytes_in_use")}, f)
atexit.register(report)
from mtjax import cli
cli.main(["mtjax", *sys.argv[1:]])
"""

DEFAULT_SHORT = ["--config.num_steps=60", "--config.log_every=10", "--config.eval_every=30",
                 "--config.checkpoint_every=0", "--config.prediction_images=0",
                 "--config.dataset.split_sizes.train=256",
                 "--config.dataset.split_sizes.validation=64",
                 "--config.dataset.split_sizes.test=64", "--config.eval_batch_size=64"]
DEFAULT_DRY = ["--config.num_steps=3", "--config.log_every=1", "--config.eval_every=0",
               "--config.checkpoint_every=0", "--config.prediction_images=0",
               "--config.dataset.image_size=(16, 16)", "--config.dataset.split_sizes.train=16",
               "--config.dataset.split_sizes.validation=8",
               "--config.dataset.split_sizes.test=8", "--config.model.width=8",
               "--config.model.head_hidden=8", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.relations.conflict=False"]
DET_SEG = ["--config.num_steps=30", "--config.log_every=10", "--config.batch_size=8",
           "--config.eval_batch_size=4", "--config.prediction_images=0",
           "--config.dataset.split_sizes.train=24", "--config.dataset.split_sizes.validation=4",
           "--config.dataset.split_sizes.test=4", "--config.optimizer.warmup_steps=5"]
DET_SEG_DRY = ["--config.num_steps=2", "--config.log_every=1", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.prediction_images=0",
               "--config.dataset.image_size=(32, 32)", "--config.model.backbone=resnet_tiny",
               "--config.model.width=8", "--config.model.head_hidden=8",
               "--config.model.stem=small", "--config.model.dtype=float32",
               "--config.dataset.split_sizes.train=8", "--config.dataset.split_sizes.validation=8",
               "--config.dataset.split_sizes.test=8", "--config.optimizer.warmup_steps=1"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry", action="store_true", help="tiny sizes, any machine (CI)")
  p.add_argument("--steps", type=int, default=None, help="timed steps of each nyuv2 row")
  p.add_argument("--workdir", default=None, help="runs' workdirs (default: a temporary folder)")
  p.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  return p.parse_args(argv)


def cli_run(args, workdir, stats_path, env):
  """One ``mtjax train`` process: (its stats, seconds of wall time)."""
  start = time.perf_counter()
  run = subprocess.run([sys.executable, "-c", BOOT, "train", "--progress_bar=false",
                        "--workdir", workdir, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "MTJAX_SMOKE_STATS": stats_path})
  seconds = time.perf_counter() - start
  if run.returncode != 0:
    raise RuntimeError(f"mtjax train {' '.join(args[:2])} exited {run.returncode}: "
                       f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ''}")
  with open(stats_path) as f:
    return json.load(f), seconds


def read_log(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def median_step_ms(log):
  rates = [r["steps_per_sec"] for r in log if r.get("steps_per_sec")]
  return 1e3 / statistics.median(rates) if rates else None


def same_run(a, b) -> tuple[bool, str]:
  """Whether two workdirs hold the same run bit for bit (every logged field but the speed, and
  the final metrics); the first difference otherwise."""
  log_a, log_b = read_log(a), read_log(b)
  strip = lambda log: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in log]
  if len(log_a) != len(log_b):
    return False, f"{len(log_a)} vs {len(log_b)} log records"
  for ra, rb in zip(strip(log_a), strip(log_b), strict=True):
    if ra != rb:
      key = next(k for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k))
      return False, f"step {ra.get('step')}: {key} {ra.get(key)} vs {rb.get(key)}"
  results = []
  for w in (a, b):
    with open(os.path.join(w, "results.json")) as f:
      saved = json.load(f)
    results.append({s: saved[s]["metrics"] for s in ("validation", "test")})
  if results[0] != results[1]:
    return False, "final metrics differ"
  return True, f"{len(log_a)} log records and the final metrics identical"


def default_rows(dry, base, env):
  args = ["--config", "experiments/configs/shapes.py", "--config.deterministic=true",
          *(DEFAULT_DRY if dry else DEFAULT_SHORT)]
  runs = []
  for i in (1, 2):
    workdir = os.path.join(base, f"default_{i}")
    stats, seconds = cli_run(args, workdir, os.path.join(base, f"default_{i}.json"), env)
    runs.append((workdir, stats, seconds))
  same, detail = same_run(runs[0][0], runs[1][0])
  return [{"check": f"default ×2 (run {i})", "compile_s": s["compile_s"],
           "step_ms": median_step_ms(read_log(w)), "peak_bytes": s["peak_bytes"],
           "wall_s": seconds, "ok": same, "detail": detail if i == 2 else "bitwise vs run 2"}
          for i, (w, s, seconds) in enumerate(runs, 1)]


def det_seg_row(dry, base, env):
  config = "experiments/configs/det_seg.py" + ("" if dry else ":gpu,ew")
  workdir = os.path.join(base, "det_seg")
  stats, seconds = cli_run(["--config", config, *(DET_SEG_DRY if dry else DET_SEG)], workdir,
                           os.path.join(base, "det_seg.json"), env)
  log = read_log(workdir)
  losses = [r["loss"] for r in log if "loss" in r]
  finite = bool(losses) and all(np.isfinite(losses))
  with open(os.path.join(workdir, "results.json")) as f:
    ap50 = json.load(f)["validation"]["metrics"].get("detection", {}).get("ap50")
  return {"check": "det_seg 512" if not dry else "det_seg (dry: 32×32)",
          "compile_s": stats["compile_s"], "step_ms": median_step_ms(log),
          "peak_bytes": stats["peak_bytes"], "wall_s": seconds, "ok": finite,
          "detail": f"{len(losses)} logged losses finite: {finite}; validation AP50 {ap50}"}


def nyu_rows(dry, steps):
  cfg = memory_plan.setup_config("nyuv2", tiny=dry)
  tasks = memory_plan.setup_tasks(cfg, len(cfg.tasks))
  rows = []
  for name, level in NYU_METHODS:
    row = {"check": f"nyuv2 {name} ({level})"}
    try:
      compiled, trainer, abstract, memory, seconds = memory_plan.compile_step(
          cfg, tasks, weighting.get(name), level)
      state = trainer.init(jax.random.PRNGKey(0))
      batch = random_batch(abstract[1], np.random.default_rng(0))
      start = time.perf_counter()
      state, _ = jax.block_until_ready(compiled(state, batch))
      first = time.perf_counter() - start
      times = []
      for _ in range(steps):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, batch))
        times.append(1e3 * (time.perf_counter() - start))
      stats = jax.devices()[0].memory_stats() or {}
      row.update(compile_s=seconds + first, step_ms=statistics.median(times),
                 peak_bytes=stats.get("peak_bytes_in_use"), xla_peak_bytes=memory["peak"],
                 ok=True, detail=f"median of {steps} steps")
      del state
    except Exception as e:  # noqa: BLE001 -- a failing row (out of memory) is the finding
      row.update(ok=False, detail=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    rows.append(row)
    jax.clear_caches()
  return rows


def random_batch(abstract, rng):
  """Arrays of the batch's shapes and dtypes: images in [0, 1), labels in their ranges."""
  out = {}
  for key, spec in abstract.items():
    if np.issubdtype(spec.dtype, np.integer):
      out[key] = rng.integers(0, 5, size=spec.shape).astype(spec.dtype)
    elif spec.dtype == np.bool_:
      out[key] = rng.uniform(size=spec.shape) > 0.1
    elif key == "normals":
      v = rng.normal(size=spec.shape)
      out[key] = (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(spec.dtype)
    else:
      out[key] = rng.uniform(0.1, 1.0, size=spec.shape).astype(spec.dtype)
  return out


def markdown(info, rows):
  mb = lambda b: "–" if b is None else f"{b / 2**20:.0f}"
  num = lambda v, f: "–" if v is None else format(v, f)
  lines = [f"`bash benchmarks/gpu.sh smoke`{' (GPU_DRY=1)' if info['dry'] else ''}: "
           f"{info['device_kind']} ({info['backend']}), jax {info['jax']}, {info['date']}", "",
           "| check | compile (s) | step (ms, median) | peak device memory (MiB) | "
           "XLA estimate (MiB) | ok | detail |", "|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    lines.append(f"| {r['check']} | {num(r.get('compile_s'), '.1f')} | "
                 f"{num(r.get('step_ms'), '.1f')} | {mb(r.get('peak_bytes'))} | "
                 f"{mb(r.get('xla_peak_bytes'))} | {'yes' if r['ok'] else 'NO'} | "
                 f"{r['detail']} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  base = args.workdir or tempfile.mkdtemp(prefix="mtjax-smoke-")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  env.setdefault("MTJAX_DATA_DIR", os.path.join(base, "data"))
  rows = []
  for part in (lambda: default_rows(args.dry, base, env),
               lambda: [det_seg_row(args.dry, base, env)],
               lambda: nyu_rows(args.dry, args.steps or (2 if args.dry else 10))):
    start = time.perf_counter()
    rows += part()
    print(f"{rows[-1]['check']}: {time.perf_counter() - start:.0f} s", flush=True)
  info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "jax": jax.__version__, "dry": args.dry}
  text = markdown(info, rows)
  print(text)
  if args.out:
    write_result(args.out, {"info": info, "rows": rows}, text + "\n")
  return rows


if __name__ == "__main__":
  sys.exit(0 if all(r["ok"] for r in main()) else 1)
