"""Input throughput: training images per second reaching the device, per loader and workers.

    PYTHONPATH=. python benchmarks/input_throughput.py --out benchmarks/results/input_throughput_cpu

Two inputs:
  * ``shapes``: the embedded dataset's in-memory arrays (64×64, batch 32, no augmentation), as
    the default experiment reads them (``mtjax.data.pipeline.train_batch``);
  * ``nyuv2``: NYUv2-sized mock files written in the MTAN/LibMTL layout (288×384, float32
    image, label, depth, normals: ≈ 4.4 MB an example, as the real release stores them), read
    lazily from disk with LibMTL's augmentation (``scale_crop``, ``hflip``), batch 8.
Each row times ``--batches`` batches after ``--warmup``, each placed on the device
(``mtjax.train.step.shard_batch``) and waited for, so the figure is what a train step could
consume. The train step's own rate comes from ``benchmarks/results/step_time_cpu_tiny.json``
(this CPU, the default experiment) and ../shared/REFERENCE.md (ResNet-50, batch 16 of 288×384:
13.0 ms a step on an H100, ≈ 1230 images/s), which sets the cores a GPU host needs.
The page cache holds the mock files after the warm-up: this is decode + augmentation + copy,
not disk bandwidth. Each row also reports the process's CPU time per image (all threads), the
figure that sets the cores needed, since on a loaded machine the wall rate mostly measures the
other jobs (for ``grain_processes`` it leaves out the worker processes' CPU).
"""

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks.step_time import write_result
from mtjax import tasks
from mtjax.data import augment, pipeline, sources
from mtjax.train import step as step_lib

GPU_STEP_IMAGES_PER_S = 16 / 0.0130   # REFERENCE.md: H100, ResNet-50, batch 16 of 288×384


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=int, default=12)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--examples", type=int, default=48, help="mock NYUv2 examples written")
  p.add_argument("--image-size", type=int, nargs=2, default=(288, 384))
  p.add_argument("--workers", default="0,1,2,4")
  p.add_argument("--loaders", default="threads,grain,grain_processes")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def _mock_nyuv2(root, n, hw):
  rng = np.random.default_rng(0)
  for split in ("train",):
    examples = []
    for _ in range(n):
      normal = rng.normal(size=(*hw, 3)).astype(np.float32)
      normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
      examples.append({"image": rng.uniform(0, 1, (*hw, 3)).astype(np.float32),
                       "label": rng.integers(-1, 13, hw).astype(np.float32),
                       "depth": rng.uniform(0, 10, (*hw, 1)).astype(np.float32),
                       "normal": normal})
    sources.write_preprocessed(root, split, examples)


def _shapes_arrays(n=512, hw=(64, 64)):
  """Arrays with the embedded dataset's keys, shapes and dtypes (no build needed)."""
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(size=(n, *hw, 3)).astype(np.float32),
          "segmentation": rng.integers(0, 5, (n, *hw)).astype(np.int32),
          "depth": rng.uniform(1, 9, (n, *hw)).astype(np.float32),
          "depth_valid": np.ones((n, *hw), bool),
          "normals": rng.normal(size=(n, *hw, 3)).astype(np.float32)}


def measure(data, *, batch_size, transform, loader, workers, batches, warmup, mesh):
  it = pipeline.batches(data, seed=0, start=0, stop=warmup + batches, batch_size=batch_size,
                        transform=transform, num_workers=workers, loader=loader)
  for _ in range(warmup):
    jax.block_until_ready(step_lib.shard_batch(next(it)[1], mesh))
  start, cpu = time.perf_counter(), time.process_time()
  for _, batch in it:
    jax.block_until_ready(step_lib.shard_batch(batch, mesh))
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  images = batches * batch_size
  return {"images_per_s": images / seconds, "cpu_ms_per_image": 1000 * cpu / images}


def _cpu_step_rate():
  path = os.path.join(os.path.dirname(__file__), "results", "step_time_cpu_tiny.json")
  with open(path) as f:
    saved = json.load(f)
  ew = saved["info"]["ew_median_ms"]
  return saved["info"]["batch"] / (ew / 1000.0), ew


def main(argv=None):
  args = parse_args(argv)
  mesh = step_lib.make_mesh()
  workers = [int(w) for w in args.workers.split(",")]
  loaders = args.loaders.split(",")
  rows = []
  load = os.getloadavg()
  shapes = _shapes_arrays()
  rows.append(dict(input="shapes 64×64", loader="in memory", workers=0, batch=32,
                   **measure(shapes, batch_size=32, transform=None, loader="threads",
                             workers=0, batches=args.batches * 4, warmup=args.warmup,
                             mesh=mesh)))
  print(rows[-1], flush=True)
  hw = tuple(args.image_size)
  transform = augment.compose(("scale_crop", "hflip"),
                              [tasks.get("segmentation", num_classes=13), tasks.get("depth"),
                               tasks.get("normals")])
  with tempfile.TemporaryDirectory() as root:
    _mock_nyuv2(root, args.examples, hw)
    source = sources.preprocessed_source(root, "train", num_classes=13, normals=True)
    for loader in loaders:
      for w in workers:
        if loader != "threads" and w == 0:
          continue
        try:
          rate = measure(source, batch_size=8, transform=transform, loader=loader, workers=w,
                         batches=args.batches, warmup=args.warmup, mesh=mesh)
          rows.append(dict(input=f"nyuv2 mock {hw[0]}×{hw[1]} + aug", loader=loader,
                           workers=w, batch=8, **rate))
        except Exception as e:  # noqa: BLE001 -- a loader that fails gets an error row
          rows.append(dict(input=f"nyuv2 mock {hw[0]}×{hw[1]} + aug", loader=loader,
                           workers=w, batch=8, error=f"{type(e).__name__}: {e}"[:200]))
        print(rows[-1], flush=True)
    plain = measure(source, batch_size=8, transform=None, loader="threads", workers=0,
                    batches=args.batches, warmup=args.warmup, mesh=mesh)
    rows.append(dict(input=f"nyuv2 mock {hw[0]}×{hw[1]}, no aug", loader="threads", workers=0,
                     batch=8, **plain))
  cpu_rate, cpu_ms = _cpu_step_rate()
  serial = next(r for r in rows if r["loader"] == "threads"
                and r["workers"] == 0 and "+ aug" in r["input"])
  info = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              jax=jax.__version__, cpus=os.cpu_count(), load_before=load,
              load_after=os.getloadavg(), batches=args.batches, warmup=args.warmup,
              cpu_step_images_per_s=cpu_rate, cpu_step_ms=cpu_ms,
              gpu_step_images_per_s=GPU_STEP_IMAGES_PER_S,
              cpu_ms_per_image=serial["cpu_ms_per_image"],
              cores_for_gpu=GPU_STEP_IMAGES_PER_S * serial["cpu_ms_per_image"] / 1000)
  result = {"info": info, "rows": rows}
  table = markdown(info, rows)
  print(table, flush=True)
  if args.out:
    write_result(args.out, result, table)
  return result


def markdown(info, rows) -> str:
  lines = [
      "# Input throughput (images/s reaching the device)", "",
      f"- {info['date']}, jax {info['jax']}, {info['cpus']} CPUs, load average before "
      f"{info['load_before'][0]:.1f}, after {info['load_after'][0]:.1f} (a shared machine: "
      "other jobs ran; the figures are lower bounds)",
      f"- {info['batches']} batches timed after {info['warmup']} warm-up, each placed on the "
      "device and waited for", "",
      "| input | loader | workers | batch | images/s (wall) | CPU ms / image |",
      "|---|---|---|---|---|---|"]
  for r in rows:
    value = (f"{r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.1f}" if "images_per_s" in r
             else f"{r['error']} | ")
    lines.append(f"| {r['input']} | {r['loader']} | {r['workers']} | {r['batch']} | {value} |")
  lines += [
      "",
      f"Train step consumption: the default experiment on this CPU "
      f"{info['cpu_step_images_per_s']:.0f} images/s (EW step {info['cpu_step_ms']:.0f} ms, "
      "batch 32, benchmarks/results/step_time_cpu_tiny.json); ResNet-50 at 288×384 on an H100 "
      f"{info['gpu_step_images_per_s']:.0f} images/s (REFERENCE.md). NYUv2 with augmentation costs "
      f"{info['cpu_ms_per_image']:.1f} ms of CPU time an image (read, scale-crop, flip, "
      "stack, device copy; CPU time, so the machine's load inflates it less than the wall "
      f"figures), so a GPU host needs ≈ {info['cores_for_gpu']:.0f} cores of input workers "
      "(`config.dataset.num_workers`) to keep up with that step.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main(sys.argv[1:])
