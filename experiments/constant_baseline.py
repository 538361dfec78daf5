"""The best constant predictors of depth and normals, scored with mtjax's own metrics.

    python experiments/constant_baseline.py [--image-size 64] [--split validation]

Depth: the median training depth (the L1-optimal constant). Normals: the normalised mean
training normal. These are the "clearly better than a constant predictor" reference points of
the default experiment.
"""

import argparse

import numpy as np

from mtjax import data, metrics, tasks


def constant_results(train, evaluation) -> dict:
  depth_const = float(np.median(train["depth"][train["depth_valid"]]))
  mean_normal = train["normals"][train["depth_valid"]].mean(axis=0)
  mean_normal /= np.linalg.norm(mean_normal)
  n, h, w = evaluation["depth"].shape
  outputs = {"depth": np.full((n, h, w, 1), depth_const, np.float32),
             "normals": np.broadcast_to(mean_normal, (n, h, w, 3)).astype(np.float32)}
  task_fns = {name: tasks.get(name) for name in outputs}
  totals = {name: task.metrics_fn(outputs[name], evaluation) for name, task in task_fns.items()}
  return metrics.summarize(task_fns, metrics.accumulate(None, totals))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--split", default="validation")
  args = parser.parse_args()
  size = (args.image_size, args.image_size)
  train = data.load_split("shapes", "train", image_size=size)
  evaluation = data.load_split("shapes", args.split, image_size=size)
  print(metrics.format_table(constant_results(train, evaluation),
                             title=f"constant predictors, {args.split} split"))


if __name__ == "__main__":
  main()
