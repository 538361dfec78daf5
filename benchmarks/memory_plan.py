"""Device memory before the device: XLA's compiled memory analysis of a train step.

    PYTHONPATH=. python benchmarks/memory_plan.py --out benchmarks/results/memory_plan_cpu

For each setup, number of tasks T and gradient level, the train step is lowered on abstract
shapes (``jax.ShapeDtypeStruct``: nothing is allocated) and compiled, and
``compiled.memory_analysis()`` gives XLA's buffer assignment: the step's arguments (the train
state and the batch), its outputs, the bytes aliased between them (the donated state) and the
temporaries. Peak ≈ arguments + outputs − aliased + temporaries, against a device of
``--device-gb`` (80 GB: an H100).

Setups:
  * ``det_seg512``: ``experiments/configs/det_seg.py:gpu`` — ResNet-50 with FCOS and
    segmentation at 512×512, batch 32, bfloat16 (T = 2: its tasks);
  * ``nyuv2``: ``experiments/configs/nyuv2.py`` — the NYUv2 protocol's model at 288×384,
    batch 8 (T = 2: segmentation, depth; 3: + normals; 10: + seven more depth heads, each with
    its own head, reading the depth labels).
Levels: ``loss`` (ew: one backward), ``parameter`` and ``representation`` (upgrad: T per-task
gradients of the shared parameters / of the shared features).

Compiled for this machine's backend: on a CPU, XLA's CPU buffer assignment, which is not the
GPU's (no cuDNN workspaces, other fusions); the GPU figure comes from the same script on the
GPU (``bash benchmarks/gpu.sh memory``).
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.step_time import write_result
from mtjax import config as config_lib
from mtjax import models, weighting
from mtjax import tasks as tasks_lib
from mtjax.train import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = {"det_seg512": ("det_seg.py", "gpu"), "nyuv2": ("nyuv2.py", None)}
LEVEL_METHOD = {"loss": ("ew", "parameter"), "parameter": ("upgrad", "parameter"),
                "representation": ("upgrad", "representation")}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--setups", default="det_seg512,nyuv2")
  p.add_argument("--num-tasks", default="2,3,10", help="nyuv2's T values")
  p.add_argument("--levels", default="loss,parameter,representation")
  p.add_argument("--device-gb", type=float, default=80.0)
  p.add_argument("--tiny", action="store_true",
                 help="a tiny model and 32×32 images (tests this script in seconds)")
  p.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  return p.parse_args(argv)


def setup_config(name, tiny=False):
  """The setup's config (``--tiny``: resnet_tiny, width 8, 32×32, batch 8)."""
  file, arg = SETUPS[name]
  spec = os.path.join(ROOT, "experiments", "configs", file)
  cfg = _load(spec).get_config(arg)
  if tiny:
    cfg.dataset.image_size = (32, 32)
    cfg.model.backbone, cfg.model.width, cfg.model.head_hidden = "resnet_tiny", 8, 8
    cfg.model.stem, cfg.model.output_stride, cfg.batch_size = "small", 8, 8
  return cfg


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def setup_tasks(cfg, num_tasks):
  """The config's tasks, cut to ``num_tasks`` or extended with depth heads (``depth_i``)."""
  options = config_lib.task_options(cfg)
  names = list(cfg.tasks)[:num_tasks]
  out = {n: tasks_lib.get(n, **options[n]) for n in names}
  for i in range(1, num_tasks - len(names) + 1):
    out[f"depth_{i}"] = tasks_lib.get("depth", **options.get("depth", {}))
  return out


def abstract_batch(tasks, image_size, batch):
  """``jax.ShapeDtypeStruct``s of one batch: the image and every task's labels."""
  out = {"image": jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32)}
  for task in tasks.values():
    for key, (shape, dtype) in task.label_spec(tuple(image_size)).items():
      out[key] = jax.ShapeDtypeStruct((batch, *shape), np.dtype(dtype))
  return out


def compile_step(cfg, tasks, method, grad_level):
  """The config's train step for ``tasks`` and ``method`` at ``grad_level``, compiled on
  abstract shapes: ``(compiled, trainer, (state, batch) abstract, memory, compile seconds)``;
  ``memory``: XLA's analysis in bytes (``peak`` = arguments + outputs − aliased +
  temporaries)."""
  model = models.build(cfg.model.backbone, tasks, **config_lib.model_kwargs(cfg))
  image_size = tuple(cfg.dataset.image_size)
  optimizer = optax.adam(1e-4)   # both setups train with Adam: two moments per parameter
  trainer = trainer_lib.make_trainer(model, tasks, method, optimizer,
                                     image_shape=(*image_size, 3), batch_size=cfg.batch_size,
                                     grad_level=grad_level, mesh=None)
  state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
  batch = abstract_batch(tasks, image_size, cfg.batch_size)
  start = time.perf_counter()
  compiled = jax.jit(lambda s, b: trainer.step(s, b)).lower(state, batch).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  memory = {f.removesuffix("_size_in_bytes"): int(getattr(m, f)) for f in fields}
  memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
  return compiled, trainer, (state, batch), memory, seconds


def analyse(cfg, tasks, level):
  """XLA's memory analysis of one compiled train step (bytes), its compile seconds and the
  parameter count."""
  method_name, grad_level = LEVEL_METHOD[level]
  _, _, (state, _), memory, seconds = compile_step(cfg, tasks, weighting.get(method_name),
                                                   grad_level)
  params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  return memory, seconds, params


def markdown(result) -> str:
  """The table of a result. "donated": the trainer's step donates its state, so its new state
  takes the old one's buffers: ≈ arguments + temporaries (the analysis above compiles the step
  inside a jit that does not donate, hence nothing aliased)."""
  gb = lambda b: f"{b / 1e9:.2f}"
  lines = [f"XLA's compiled memory analysis of one train step ({result['backend']}, "
           f"{result['device_kind']}, jax {result['jax']}); GB = 1e9 bytes, against "
           f"{result['device_gb']:.0f} GB", "",
           "| setup | T | level | method | image | batch | dtype | parameters | arguments | "
           "outputs | temporaries | peak | peak, state donated | fits | compile (s) |",
           "|---|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
  for r in result["rows"]:
    head = (f"| {r['setup']} | {r['num_tasks']} | {r['level']} | {r['method']} | "
            f"{r['image_size'][0]}×{r['image_size'][1]} | {r['batch']} | {r['dtype']} |")
    if "error" in r:
      lines.append(f"{head} {r['error']} | | | | | | | |")
      continue
    m = r["memory"]
    donated = m["argument"] + m["temp"]
    lines.append(f"{head} {r['params'] / 1e6:.1f} M | {gb(m['argument'])} | {gb(m['output'])} | "
                 f"{gb(m['temp'])} | {gb(m['peak'])} | {gb(donated)} | "
                 f"{'yes' if r['fits'] else 'NO'} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  rows = []
  for setup in args.setups.split(","):
    cfg = setup_config(setup, args.tiny)
    counts = [len(cfg.tasks)] if setup == "det_seg512" else [
        int(t) for t in args.num_tasks.split(",")]
    for num_tasks in counts:
      tasks = setup_tasks(cfg, num_tasks)
      for level in args.levels.split(","):
        row = {"setup": setup, "num_tasks": num_tasks, "level": level,
               "method": LEVEL_METHOD[level][0], "image_size": list(cfg.dataset.image_size),
               "batch": cfg.batch_size, "dtype": cfg.model.dtype}
        try:
          memory, seconds, params = analyse(cfg, tasks, level)
          row.update(memory=memory, compile_s=seconds, params=params,
                     fits=memory["peak"] <= args.device_gb * 1e9)
        except Exception as e:  # noqa: BLE001 -- one failing row is reported, the rest run
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        jax.clear_caches()
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__, "device_gb": args.device_gb, "rows": rows}
  text = markdown(result)
  print(text)
  if args.out:
    write_result(args.out, result, text + "\n")
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
