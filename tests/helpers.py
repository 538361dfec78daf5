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


def _config_module(name):
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "experiments" / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _override(cfg, overrides):
  for key, value in overrides.items():
    target = cfg
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return cfg


def tiny_config(data_dir, **overrides):
  """The default experiment shrunk to seconds: 32×32 images, a few dozen examples."""
  cfg = _config_module("shapes").get_config(overrides.pop("method", None))
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
  cfg.relations.conflict = False  # so does the conflict branch of the step (on by default)
  return _override(cfg, overrides)


def tiny_det_seg_config(data_dir, **overrides):
  """``experiments/configs/det_seg.py`` shrunk: 32×32 images, 8 training examples, width 8."""
  cfg = _config_module("det_seg").get_config(overrides.pop("method", None))
  cfg.dataset.image_size = (32, 32)
  cfg.dataset.data_dir = str(data_dir)
  cfg.dataset.split_sizes = ml_collections.ConfigDict({"train": 8, "validation": 4, "test": 4})
  cfg.model.width = 8
  cfg.model.head_hidden = 8
  cfg.batch_size = 8
  cfg.eval_batch_size = 8
  cfg.num_steps = 2
  cfg.log_every = 1
  cfg.checkpoint_every = 0
  cfg.optimizer.warmup_steps = 1
  cfg.baselines = ml_collections.ConfigDict()
  return _override(cfg, overrides)


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


def host_variables(model, image_shape, seed=0):
  """``{"params", "batch_stats"}`` of ``model`` drawn on the host, without compiling anything
  (flax's ``init`` of the det_seg model, eager or jitted, costs ≈ 10–40 s on the 2-core CPU):
  the shapes from ``jax.eval_shape``; kernels He-normal (``sqrt(2 / fan_in)``), BatchNorm and
  GroupNorm scales and FCOS's level scales 1, biases 0, running means 0 and variances 1."""
  import flax.traverse_util as traverse
  import jax.numpy as jnp

  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, *image_shape)), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1]
    if leaf.ndim >= 2:
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
    elif name in ("bias", "mean"):
      value = np.zeros(leaf.shape)
    else:  # scale, var, the FCOS level scales
      value = np.ones(leaf.shape)
    return jnp.asarray(value.astype(leaf.dtype))

  def fill(tree):
    flat = traverse.flatten_dict(dict(tree))
    return traverse.unflatten_dict({p: draw(p, leaf) for p, leaf in flat.items()})

  return {"params": fill(shapes["params"]), "batch_stats": fill(shapes.get("batch_stats", {}))}
