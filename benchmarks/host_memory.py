"""Host memory of the embedded dataset at 512×512 (det_seg's GPU variant), before a step runs.

    PYTHONPATH=. python benchmarks/host_memory.py --out benchmarks/results/host_memory_cpu

Builds the embedded dataset at ``--size`` with a small training split (``--examples``; the
renderer takes ≈ 2 s an image at 512×512 here), then, each in a fresh process, measures the
peak resident memory (``ru_maxrss``) of two ways to read it:

* ``every key, whole``: what the loop did before it picked its keys first —
  ``data.load_split`` (every label the renderer writes: image, segmentation, instances, depth,
  depth_valid, normals, boxes) stacked in memory;
* ``det_seg's keys``: what ``setup.load_data`` does now for det_seg's tasks (image,
  segmentation, boxes, box_classes), whole if they fit in ``data.loading.IN_MEMORY_BYTES``,
  else lazily (then the figure is one process reading ``--batches`` batches of 8). The budget
  is scaled by ``examples / 4000`` in that process, so that the small split takes the path the
  full one takes.

Both are extrapolated to the default split sizes (4000 train + 500 validation + 500 test read
by a run) from the measured bytes per example; the lazy path's memory does not grow with the
split.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.step_time import write_result

SPLITS = {"train": 4000, "validation": 500, "test": 500}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--examples", type=int, default=40, help="training examples rendered")
  p.add_argument("--batches", type=int, default=4, help="lazy path: batches of 8 read")
  p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mtjax-hostmem"))
  p.add_argument("--out", default=None, help="writes OUT.json and OUT.md")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _config(args):
  from tests import helpers
  cfg = helpers.tiny_det_seg_config(args.data_dir)
  cfg.dataset.image_size = (args.size, args.size)
  cfg.dataset.split_sizes.train = args.examples
  cfg.dataset.split_sizes.validation = 2
  cfg.dataset.split_sizes.test = 2
  cfg.batch_size = 8
  return cfg


def _child(args) -> dict:
  """One way of reading, in this fresh process: bytes held and peak RSS."""
  from mtjax import data
  from mtjax.data import pipeline, sources
  from mtjax.train import setup
  cfg = _config(args)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if args.child == "every key, whole":
    arrays = data.load_split("shapes", "train", image_size=tuple(cfg.dataset.image_size),
                             data_dir=args.data_dir, split_sizes=dict(cfg.dataset.split_sizes))
    lazy, held = False, sum(v.nbytes for v in arrays.values())
    per_example = held / args.examples
  else:   # the budget scaled to the small split: it takes the path the full split takes
    from mtjax.data import loading
    loading.IN_MEMORY_BYTES = loading.IN_MEMORY_BYTES * args.examples // SPLITS["train"]
    exp = setup.build(cfg)
    arrays = setup.load_data(cfg, "train", exp.label_keys)
    lazy = isinstance(arrays, sources.Source)
    first = sources.read_examples(arrays, [0])[0] if lazy else {k: v[0] for k, v in arrays.items()}
    per_example = sum(np.asarray(v).nbytes for v in first.values())
    held = 0 if lazy else sum(v.nbytes for v in arrays.values())
    for step in range(args.batches if lazy else 0):
      pipeline.train_batch(arrays, seed=0, step=step, batch_size=cfg.batch_size)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"lazy": lazy, "bytes_per_example": per_example, "held_bytes": held,
          "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - base) / 1024}


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    print(json.dumps(_child(args)))
    return
  from mtjax import data
  from mtjax.data import loading
  cfg = _config(args)
  data.open_split("shapes", "train", image_size=(args.size, args.size), data_dir=args.data_dir,
                  split_sizes=dict(cfg.dataset.split_sizes))   # renders the split once
  rows = []
  for way in ("every key, whole", "det_seg's keys"):
    run = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child", way],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    row = {"way": way, **json.loads(run.stdout.strip().splitlines()[-1])}
    total = sum(SPLITS.values()) * row["bytes_per_example"]
    whole_at_full = total <= loading.IN_MEMORY_BYTES
    row["full_splits_gb"] = total / 1e9
    row["held_at_full_gb"] = total / 1e9 if (way == "every key, whole" or whole_at_full) else 0.0
    rows.append(row)
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "size": args.size, "examples": args.examples, "splits": SPLITS,
            "in_memory_bytes": loading.IN_MEMORY_BYTES, "rows": rows}
  lines = [f"Embedded dataset at {args.size}×{args.size}, {args.examples} training examples "
           f"rendered; extrapolated to {SPLITS} (python {sys.version.split()[0]}, "
           f"{os.cpu_count()} CPUs)", "",
           "| reading | bytes/example | read lazily | measured peak RSS (MB) | held at the "
           "full splits (GB) |", "|---|---:|---|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['way']} | {r['bytes_per_example'] / 1e6:.2f} MB | "
                 f"{'yes' if r['lazy'] else 'no'} | {r['peak_rss_mb']:.0f} | "
                 f"{r['held_at_full_gb']:.1f} |")
  text = "\n".join(lines)
  print(text)
  if args.out:
    write_result(args.out, result, text + "\n")


if __name__ == "__main__":
  main()
