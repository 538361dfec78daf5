"""Train-step time and agreement on 1, 2, 4, 8 simulated CPU devices, data-parallel and FSDP.

    PYTHONPATH=. nice -n 10 python benchmarks/devices.py --out benchmarks/results/devices_cpu

One process with 8 host devices (``--xla_force_host_platform_device_count``, set here before jax
is imported): for each device count n and each mesh, ``data`` (``{"data": n, "fsdp": 1}``, pure
data parallelism) and ``fsdp`` (``{"data": 1, "fsdp": n}``: parameters and optimizer state split
n ways, :func:`mtjax.train.step.state_shardings`), the same global batch and initial state go
through the trainer's jitted step. Reported: compile seconds, the median step time, its ratio
to one device, and the largest difference from one device's parameters after the first step,
relative to the largest update of that step (float32 noise). The simulated devices share the
machine's cores, so this is a figure of correctness and of the cost of the partitioning and
collectives, not a speed claim.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import step_time  # noqa: E402
from mtjax import weighting  # noqa: E402
from mtjax.train import step as step_lib  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", choices=sorted(step_time.SETUPS), default="tiny")
  p.add_argument("--image-size", default="32", help="H or HxW (default 32)")
  p.add_argument("--batch", type=int, default=16, help="the global batch, every device count")
  p.add_argument("--methods", default="ew,pcgrad",
                 help="comma-separated; gradient-level methods run at the parameter level")
  p.add_argument("--counts", default="1,2,4,8", help="device counts")
  p.add_argument("--meshes", default="data,fsdp", help="data: data parallel; fsdp: FSDP")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default=None, help="output path prefix: PREFIX.json and PREFIX.md")
  return p.parse_args(argv)


def mesh_shape(kind: str, n: int) -> dict:
  return {"data": n, "fsdp": 1} if kind == "data" or n == 1 else {"data": 1, "fsdp": n}


def measure(name, kind, n, model, tasks, optimizer, cfg, batch, base):
  """``(compile s, [step ms], params after the first step, fraction of leaves split)``."""
  mesh = step_lib.make_mesh(jax.devices()[:n], mesh_shape(kind, n))
  method = weighting.get(name)
  trainer = step_time.make_trainer(model, tasks, method, optimizer, "parameter", cfg, mesh)
  state = step_time.fresh_state(base, model, method, len(tasks), "parameter", cfg)
  state = step_lib.place(state, trainer.shardings)  # as trainer.init lays it out
  leaves = jax.tree_util.tree_leaves(state.params)
  split = sum(not x.sharding.is_fully_replicated for x in leaves) / len(leaves)
  device_batch = step_lib.shard_batch(batch, mesh)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(trainer.step(state, device_batch))
  compile_s = time.perf_counter() - start
  first = jax.device_get(state.params)
  for _ in range(cfg["warmup"]):
    state, _ = jax.block_until_ready(trainer.step(state, device_batch))
  times = []
  for _ in range(cfg["steps"]):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(trainer.step(state, device_batch))
    times.append(1e3 * (time.perf_counter() - start))
  return compile_s, times, first, split


def update_rel_diff(params, reference, initial) -> float:
  """max |params - reference| / max |reference - initial|: the difference from one device's
  parameters after the first step, relative to the size of that step's update."""
  def max_abs(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                               strict=True))
  return max_abs(params, reference) / max(max_abs(reference, initial), 1e-30)


def markdown(info, rows) -> str:
  lines = [
      "# Train-step time per device count (simulated CPU devices)", "",
      f"- {info['num_cpu_devices']} simulated devices on {info['cores']} cores ({info['cpu']}); "
      "they share the cores: a correctness and overhead figure, not a speed claim",
      f"- jax {info['jax']}, flax {info['flax']}; setup {info['setup']}, global batch "
      f"{info['batch']} of {info['image_size'][0]}×{info['image_size'][1]}, 3 tasks, float32, "
      "SGD momentum 0.9; "
      f"median of {info['steps']} steps after {info['warmup']} warm-up steps",
      f"- load average (1, 5, 15 min): before {info['load_before']}, after {info['load_after']}",
      f"- date: {info['date']}", "",
      "| method | mesh | devices | data × fsdp | leaves split | median ms | vs 1 device | "
      "compile s | params vs 1 device after step 1 (max diff / max update) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['mesh']} | {r['devices']} | — | — | "
                   f"error: {r['error'][:80]} | — | — | — |")
      continue
    shape = r["shape"]
    lines.append(f"| {r['method']} | {r['mesh']} | {r['devices']} | {shape['data']} × "
                 f"{shape['fsdp']} | {r['split']:.0%} | {r['median_ms']:.1f} | "
                 f"{r['ratio']:.2f} | {r['compile_s']:.1f} | {r['max_rel_diff']:.1e} |")
  return "\n".join(lines) + "\n"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def main(argv=None):
  args = parse_args(argv)
  sargs = step_time.parse_args(["--setup", args.setup, "--image-size", args.image_size,
                                "--batch", str(args.batch), "--warmup", str(args.warmup),
                                "--steps", str(args.steps)])
  cfg = step_time.resolve(sargs)
  # SGD (momentum 0.9), not the tiny setup's Adam: Adam's first update, g / |g|, turns float
  # noise on near-zero gradients into ±lr, which would hide the agreement this measures.
  cfg.update(optimizer="sgd", learning_rate=1e-2)
  counts = [int(c) for c in args.counts.split(",")]
  kinds = [k.strip() for k in args.meshes.split(",")]
  methods = [m.strip() for m in args.methods.split(",")]
  if max(counts) > jax.device_count() or any(args.batch % n for n in counts):
    raise ValueError(f"--counts {counts}: at most {jax.device_count()} devices, each dividing "
                     f"--batch {args.batch}")
  model, tasks, optimizer = step_time.build_setup(cfg)
  batch = step_time.synthetic_batch(np.random.default_rng(0), cfg["batch"], cfg["image_size"],
                                    cfg["num_classes"])
  base = step_time.base_state(model, tasks, optimizer, cfg)  # one jitted init, on the host
  info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
          "num_cpu_devices": jax.device_count(), "jax": jax.__version__,
          "flax": flax.__version__, "setup": args.setup, "batch": cfg["batch"],
          "image_size": list(cfg["image_size"]), "steps": cfg["steps"],
          "warmup": cfg["warmup"], "load_before": [round(x, 2) for x in os.getloadavg()],
          "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  print(json.dumps(info), flush=True)
  rows = []
  for name in methods:
    reference = None
    for n in counts:
      for kind in (kinds if n > 1 else kinds[:1]):
        row = {"method": name, "mesh": kind if n > 1 else "one device", "devices": n,
               "shape": mesh_shape(kind, n)}
        try:
          compile_s, times, first, split = measure(name, kind, n, model, tasks, optimizer,
                                                   cfg, batch, base)
        except Exception as e:  # noqa: BLE001 -- reported as a row, the run goes on
          row["error"] = f"{type(e).__name__}: {e}"
        else:
          if reference is None:
            reference = (statistics.median(times), first)
          row.update(compile_s=compile_s, times_ms=times, median_ms=statistics.median(times),
                     ratio=statistics.median(times) / reference[0], split=split,
                     max_rel_diff=update_rel_diff(first, reference[1], base.params))
        finally:
          jax.clear_caches()
          gc.collect()
        rows.append(row)
        print({k: v for k, v in row.items() if k != "times_ms"}, flush=True)
  info["load_after"] = [round(x, 2) for x in os.getloadavg()]
  table = markdown(info, rows)
  print(table, flush=True)
  if args.out:
    step_time.write_result(args.out, {"info": info, "rows": rows}, table)
  return {"info": info, "rows": rows}


if __name__ == "__main__":
  main(sys.argv[1:])
