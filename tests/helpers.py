"""Small shared fixtures: a tiny multi-task model and real scenes from the renderer."""

import jax
import ml_collections
import numpy as np
import optax

from mtjax import tasks as tasks_lib
from mtjax.data import dataset_info, render_scene
from mtjax.models import build
from mtjax.train.step import make_mesh
from mtjax.train.trainer import make_trainer

TASKS = ("segmentation", "depth", "normals", "classification")


def scenes(n, size=32, seed=0):
  """A batch of ``n`` rendered scenes with every task's labels."""
  rng = np.random.default_rng(seed)
  examples = [render_scene(rng, size, size) for _ in range(n)]
  keys = ("image", "segmentation", "depth", "depth_valid", "normals", "labels")
  return {k: np.stack([e[k] for e in examples]) for k in keys}


def tiny_tasks(task_names=TASKS):
  """The tasks with the embedded dataset's options (class counts)."""
  info = dataset_info("shapes")["tasks"]
  return {n: tasks_lib.get(n, **info[n]) for n in task_names}


def tiny_setup(task_names=TASKS):
  tasks = tiny_tasks(task_names)
  model = build("resnet_tiny", tasks, width=8, output_stride=4, stem="small", head_hidden=8)
  return model, tasks, optax.sgd(0.1, momentum=0.9)


def tiny_trainer(method, grad_level="parameter", devices=None, task_names=TASKS, batch=8,
                 size=32, **kwargs):
  """``(trainer, state, mesh)`` of the tiny model: state made and replicated on ``devices``."""
  model, tasks, opt = tiny_setup(task_names)
  mesh = make_mesh(devices)
  trainer = make_trainer(model, tasks, method, kwargs.pop("optimizer", opt),
                         image_shape=(size, size, 3), batch_size=batch, grad_level=grad_level,
                         mesh=mesh, **kwargs)
  return trainer, trainer.init(jax.random.PRNGKey(0)), mesh


def tiny_config(data_dir, **overrides):
  """The default experiment shrunk to seconds: 32×32 images, a few dozen examples."""
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "experiments" / "configs" / "shapes.py"
  spec = importlib.util.spec_from_file_location("shapes_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(overrides.pop("method", None))
  cfg.dataset.image_size = (32, 32)
  cfg.dataset.data_dir = str(data_dir)
  cfg.dataset.split_sizes = ml_collections.ConfigDict({"train": 32, "validation": 8, "test": 8})
  cfg.model.width = 8
  cfg.model.head_hidden = 8
  cfg.batch_size = 8
  cfg.eval_batch_size = 8
  cfg.num_steps = 6
  cfg.log_every = 2
  cfg.eval_every = 3
  cfg.checkpoint_every = 2
  cfg.prediction_images = 0  # the prediction grids cost a compile: tests ask for them
  for key, value in overrides.items():
    target = cfg
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return cfg


def read_log(workdir):
  """The records of ``workdir/metrics.jsonl`` without the wall-clock ``steps_per_sec``."""
  import json
  import os
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  for r in records:
    r.pop("steps_per_sec", None)
  return records


def restore_latest(workdir):
  """``(step, state dict)`` of the newest checkpoint of ``workdir``, read as orbax wrote it."""
  import os

  import orbax.checkpoint as ocp

  from mtjax import checkpoint
  ckpt = os.path.join(workdir, "checkpoints")
  step = checkpoint.latest_step(ckpt)
  return step, ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(step), "state"))
