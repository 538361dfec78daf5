"""Train-step time of every weighting method relative to equal weighting, in one process.

    PYTHONPATH=. python benchmarks/step_time.py --setup tiny --out /tmp/step_time
    PYTHONPATH=. python benchmarks/step_time.py --setup resnet50 --out $OUT/step_time

For each (method, level) the state is built afresh, the step is compiled (the first call, timed
on its own), run ``--warmup`` times, then ``--steps`` single steps are timed, each ended by
``jax.block_until_ready``; the median is compared with the median of ``ew`` measured in the
same process. Gradient-level methods run at both levels ("parameter", "representation");
loss-level methods have one level; ``auto_lambda`` ("meta") runs
the trainer's meta step with a second batch as its meta batch.

Imports no ``mtjax.data`` (no TensorFlow Datasets): the batches are synthetic arrays with the
shapes and dtypes of the real ones.
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import flax
import jax
import numpy as np
import optax

from mtjax import tasks as tasks_lib
from mtjax import weighting
from mtjax.models import build
from mtjax.train import step as step_lib
from mtjax.train import trainer as trainer_lib

GRAD_LEVELS = step_lib.GRAD_LEVELS

# The two setups. "resnet50" is the measured anchor of REFERENCE.md: ResNet-50 hard sharing,
# heads conv3×3(2048→256)+BN+ReLU, conv1×1, bilinear upsampling; 13-class segmentation, depth,
# normals; batch 16 of 288×384; SGD with momentum; bf16 compute.
SETUPS = {
    "tiny": dict(backbone="resnet_tiny", width=16, stem="small", output_stride=4, head_hidden=64,
                 num_classes=5, image_size=(64, 64), batch=32, optimizer="adam",
                 learning_rate=1e-3, dtype="float32"),
    "resnet50": dict(backbone="resnet50", width=64, stem="imagenet", output_stride=8,
                     head_hidden=256, num_classes=13, image_size=(288, 384), batch=16,
                     optimizer="sgd", learning_rate=1e-2, dtype="bfloat16"),
}
BASE_TASKS = ("segmentation", "depth", "normals")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setup", choices=sorted(SETUPS), default="tiny")
  p.add_argument("--methods", default="all",
                 help="comma-separated method names, or 'all' (ew is always measured)")
  p.add_argument("--levels", default=",".join(GRAD_LEVELS),
                 help="gradient levels for gradient-level methods: parameter,representation")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=None,
                 help="timed steps (default: 20 on GPU, 10 otherwise)")
  p.add_argument("--out", default=None,
                 help="output path prefix: writes PREFIX.json and PREFIX.md")
  p.add_argument("--image-size", default=None, help="H or HxW (default: the setup's)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the setup's)")
  p.add_argument("--output-stride", type=int, default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--num-tasks", type=int, default=3,
                 help="3, or more: extra depth tasks depth_1.. with their own heads")
  p.add_argument("--task-chunk", type=int, default=0,
                 help="> 0: parameter-level methods with from_gram compute the Gram matrix this "
                      "many tasks at a time (config.task_chunk)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def resolve(args):
  """The setup's settings with the command line's overrides."""
  cfg = dict(SETUPS[args.setup])
  if args.image_size:
    h, _, w = args.image_size.lower().partition("x")
    cfg["image_size"] = (int(h), int(w or h))
  if args.batch:
    cfg["batch"] = args.batch
  if args.output_stride:
    cfg["output_stride"] = args.output_stride
  if args.dtype:
    cfg["dtype"] = args.dtype
  if args.num_tasks < len(BASE_TASKS):
    raise ValueError(f"--num-tasks: expected at least {len(BASE_TASKS)}, got {args.num_tasks}")
  cfg["num_tasks"] = args.num_tasks
  cfg["task_chunk"] = args.task_chunk
  cfg["steps"] = args.steps or (20 if jax.default_backend() == "gpu" else 10)
  cfg["warmup"] = args.warmup
  return cfg


def make_tasks(num_classes, num_tasks):
  """segmentation, depth, normals, and ``num_tasks - 3`` copies of depth (own heads)."""
  tasks = {name: tasks_lib.get(name, num_classes if name == "segmentation" else None)
           for name in BASE_TASKS}
  for i in range(1, num_tasks - len(BASE_TASKS) + 1):
    tasks[f"depth_{i}"] = tasks_lib.get("depth")  # reads batch["depth"], its own head
  return tasks


def build_setup(cfg):
  """``(model, tasks, optimizer)`` of a resolved setup."""
  tasks = make_tasks(cfg["num_classes"], cfg["num_tasks"])
  model = build(cfg["backbone"], tasks, width=cfg["width"], output_stride=cfg["output_stride"],
                stem=cfg["stem"], head_hidden=cfg["head_hidden"], dtype=cfg["dtype"])
  if cfg["optimizer"] == "sgd":
    optimizer = optax.sgd(cfg["learning_rate"], momentum=0.9)
  else:
    optimizer = optax.adam(cfg["learning_rate"])
  return model, tasks, optimizer


def synthetic_batch(rng, batch, size, num_classes):
  """Random arrays with the shapes and dtypes of a real batch."""
  h, w = size
  normals = rng.normal(size=(batch, h, w, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  return {
      "image": rng.normal(size=(batch, h, w, 3)).astype(np.float32),
      "segmentation": rng.integers(0, num_classes, size=(batch, h, w), dtype=np.int32),
      "depth": rng.uniform(0.5, 10.0, size=(batch, h, w)).astype(np.float32),
      "depth_valid": rng.uniform(size=(batch, h, w)) > 0.1,
      "normals": normals,
  }


def runs(method_names, levels):
  """(method, level) pairs in order: ew first and last, gradient methods once per level.

  ``ew`` is measured twice, at both ends of the run, and the ratios use the median of both
  measurements' steps: the first method of a process runs on a colder machine (thread pools,
  allocator, CPU clocks) and alone would bias every ratio.
  """
  ordered = ["ew"] + [m for m in method_names if m != "ew"] + ["ew"]
  out = []
  for name in ordered:
    level = weighting.get(name).level
    if level == "gradient":
      out += [(name, lvl) for lvl in levels]
    else:
      out.append((name, level))
  return out


def task_chunk_for(method, grad_level, cfg):
  """``cfg["task_chunk"]`` where it applies (parameter level, ``from_gram``, one sample), else
  0."""
  chunk = cfg.get("task_chunk", 0)
  ok = (grad_level == "parameter" and method.level == "gradient" and method.from_gram is not None
        and not method.double_sampling)  # MoDo's two halves are not computed in chunks
  return chunk if ok else 0


def make_trainer(model, tasks, method, optimizer, grad_level, cfg, mesh, task_chunk=0):
  """The mtjax trainer of one (method, level) of a resolved setup."""
  return trainer_lib.make_trainer(model, tasks, method, optimizer,
                                  image_shape=(*cfg["image_size"], 3), batch_size=cfg["batch"],
                                  grad_level=grad_level, lookahead_lr=cfg["learning_rate"],
                                  mesh=mesh, task_chunk=task_chunk)


def base_state(model, tasks, optimizer, cfg):
  """A state made once by ``make_trainer(...).init`` (with ``ew``), kept on the host.

  Initialising the model eagerly per method would compile a hundred small ops again after
  every ``jax.clear_caches()``; the per-method part of the state is only its weighting state.
  The initialisation is jitted: one compilation instead of one per op.
  """
  init = make_trainer(model, tasks, weighting.get("ew"), optimizer, "parameter", cfg, None).init
  return jax.device_get(jax.jit(init)(jax.random.PRNGKey(0)))


def fresh_state(base, model, method, num_tasks, grad_level, cfg):
  """``base`` with ``method``'s initial weighting state, as the trainer's ``init`` makes it."""
  grads_like = trainer_lib.gradient_like(model, base.params, base.batch_stats,
                                         grad_level=grad_level,
                                         image_shape=(*cfg["image_size"], 3),
                                         batch_size=cfg["batch"])
  return base._replace(weighting_state=method.init(num_tasks, grads_like))


def time_one(name, level, model, tasks, optimizer, cfg, base, batches, mesh):
  """(compile seconds, [step ms]) of one method at one level."""
  method = weighting.get(name)
  grad_level = level if level in GRAD_LEVELS else "parameter"
  state = fresh_state(base, model, method, len(tasks), grad_level, cfg)
  state = jax.block_until_ready(step_lib.replicate(state, mesh))  # one fresh buffer per leaf
  batch, meta_batch = batches
  trainer = make_trainer(model, tasks, method, optimizer, grad_level, cfg, mesh,
                         task_chunk_for(method, grad_level, cfg))
  step = lambda s: trainer.step(s, batch, meta_batch if level == "meta" else None)
  start = time.perf_counter()
  state, _ = jax.block_until_ready(step(state))  # tracing, compilation and one step
  compile_s = time.perf_counter() - start
  for _ in range(cfg["warmup"]):
    state, _ = jax.block_until_ready(step(state))
  times = []
  for _ in range(cfg["steps"]):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state))
    times.append(1e3 * (time.perf_counter() - start))
  del state, step
  return compile_s, times


def header(args, cfg, mesh):
  return {
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": mesh.size,
      "backend": jax.default_backend(),
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "setup": args.setup,
      "backbone": cfg["backbone"], "output_stride": cfg["output_stride"],
      "head_hidden": cfg["head_hidden"], "dtype": cfg["dtype"],
      "optimizer": cfg["optimizer"], "num_tasks": cfg["num_tasks"],
      "task_chunk": cfg["task_chunk"],
      "batch": cfg["batch"], "image_size": list(cfg["image_size"]),
      "warmup": cfg["warmup"], "steps": cfg["steps"],
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }


def markdown(info, rows):
  lines = [
      f"# Train-step time relative to EW ({info['setup']})", "",
      f"- device: {info['device_kind']} × {info['num_devices']} ({info['backend']})",
      f"- jax {info['jax']}, flax {info['flax']}, optax {info['optax']}",
      f"- setup: {info['setup']} ({info['backbone']}, output stride {info['output_stride']}, "
      f"head hidden {info['head_hidden']}, {info['dtype']}, {info['optimizer']}, "
      f"{info['num_tasks']} tasks)",
      f"- batch {info['batch']} of {info['image_size'][0]}×{info['image_size'][1]}; "
      f"median of {info['steps']} steps after {info['warmup']} warm-up steps",
      f"- date: {info['date']}", "",
      "| method | level | median ms | ratio to EW | compile s |",
      "|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['method']} | {r['level']} | error: {r['error'][:80]} | — | — |")
      continue
    ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
    lines.append(f"| {r['method']} | {r['level']} | {r['median_ms']:.2f} | {ratio} | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  """Runs the benchmark; returns ``{"info": ..., "rows": [...]}`` (and writes ``--out``)."""
  args = parse_args(argv)
  cfg = resolve(args)
  method_names = weighting.names() if args.methods == "all" else [
      m.strip() for m in args.methods.split(",") if m.strip()]
  for m in method_names:
    weighting.get(m)  # an unknown name fails here, naming the valid ones
  levels = [lvl.strip() for lvl in args.levels.split(",") if lvl.strip()]
  for lvl in levels:
    if lvl not in GRAD_LEVELS:
      raise ValueError(f"--levels: expected some of {GRAD_LEVELS}, got {lvl!r}")
  mesh = step_lib.make_mesh()
  if cfg["batch"] % mesh.size:
    raise ValueError(f"--batch {cfg['batch']} is not divisible by {mesh.size} devices")

  model, tasks, optimizer = build_setup(cfg)
  rng = np.random.default_rng(args.seed)
  batches = tuple(
      step_lib.shard_batch(synthetic_batch(rng, cfg["batch"], cfg["image_size"],
                                           cfg["num_classes"]), mesh)
      for _ in range(2))  # the train batch and auto_lambda's meta batch
  base = base_state(model, tasks, optimizer, cfg)

  info = header(args, cfg, mesh)
  print(json.dumps(info), flush=True)
  rows = []
  for name, level in runs(method_names, levels):
    try:
      compile_s, times = time_one(name, level, model, tasks, optimizer, cfg, base,
                                  batches, mesh)
    except Exception as e:  # noqa: BLE001 - one failing method (e.g. out of memory) is reported
      row = {"method": name, "level": level, "error": f"{type(e).__name__}: {e}"}
    else:
      row = {"method": name, "level": level, "median_ms": statistics.median(times),
             "compile_s": compile_s, "min_ms": min(times), "times_ms": times}
    finally:
      jax.clear_caches()
      gc.collect()
    rows.append(row)
    if "error" in row:
      print(f"{name:12s} {level:14s} ERROR {row['error'][:200]}", flush=True)
    else:
      print(f"{name:12s} {level:14s} {row['median_ms']:9.2f} ms  compile {compile_s:6.1f} s",
            flush=True)
  ew_times = [t for row in rows if row["method"] == "ew" and "times_ms" in row
              for t in row["times_ms"]]
  ew_ms = statistics.median(ew_times) if ew_times else None
  info["ew_median_ms"] = ew_ms
  for row in rows:
    if "median_ms" in row:
      row["ratio"] = None if ew_ms is None else row["median_ms"] / ew_ms

  result = {"info": info, "rows": rows}
  table = markdown(info, rows)
  print(table, flush=True)
  if args.out:
    write_result(args.out[:-5] if args.out.endswith(".json") else args.out, result, table)
  return result


def write_result(prefix: str, result: dict, table: str) -> None:
  """``<prefix>.json`` (the whole result) and ``<prefix>.md`` (the table)."""
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  with open(prefix + ".json", "w") as f:
    json.dump(result, f, indent=2)
  with open(prefix + ".md", "w") as f:
    f.write(table)


if __name__ == "__main__":
  main(sys.argv[1:])
