"""Validating an experiment config before anything is built or compiled.

Each error names the config field, what it got and what is allowed.
"""

import ml_collections

from mtjax import data, tasks, weighting
from mtjax.models import backbones
from mtjax.train import optim
from mtjax.train.step import GRAD_LEVELS

# Fields that change what is logged or saved, not the training trajectory: a workdir's
# checkpoint may be resumed under a config that differs only in these.
PRESENTATION_FIELDS = ("log_every", "eval_every", "checkpoint_every", "eval_batch_size",
                       "baselines", "dataset.data_dir", "progress_bar", "keep_checkpoints")


def weighting_config(name: str = "ew") -> ml_collections.ConfigDict:
  """``{"name": name, <each hyperparameter>: <its default>}`` for a config file."""
  fields = {"name": name}
  for key, value in weighting.hparams(name).items():
    # A None default (e.g. fixed weights, a preference vector) stands for an optional tuple:
    # typed, so that `--config.weighting.weights='(1., 2., 1.)'` can set it.
    fields[key] = ml_collections.FieldReference(None, field_type=tuple) if value is None else value
  return ml_collections.ConfigDict(fields)


def weighting_kwargs(cfg) -> dict:
  """The hyperparameters of ``config.weighting`` (everything but its name)."""
  return {k: v for k, v in cfg.weighting.items() if k != "name"}


def _check(ok: bool, field: str, got, allowed):
  if not ok:
    raise ValueError(f"config.{field}: got {got!r}; expected {allowed}")


def validate(cfg, num_devices: int = 1) -> None:
  """Raises ValueError naming the first bad field of ``cfg``."""
  _check(cfg.dataset.name in data.DATASETS, "dataset.name", cfg.dataset.name,
         f"one of {sorted(data.DATASETS)}")
  info = data.dataset_info(cfg.dataset.name)
  size = tuple(cfg.dataset.image_size)
  _check(len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size),
         "dataset.image_size", size, "(height, width), ints >= 8")
  names = tuple(cfg.tasks)
  _check(len(names) > 0 and len(set(names)) == len(names), "tasks", names,
         "a non-empty tuple of distinct task names")
  for name in names:
    _check(name in tasks.names(), "tasks", name, f"task names from {tasks.names()}")
    _check(name in info["tasks"], "tasks", name,
           f"tasks that dataset {cfg.dataset.name!r} labels: {sorted(info['tasks'])}")
  _check(cfg.model.backbone in backbones.names(), "model.backbone", cfg.model.backbone,
         f"one of {backbones.names()}")
  _check(cfg.model.stem in backbones.STEMS, "model.stem", cfg.model.stem,
         f"one of {backbones.STEMS}")
  _check(cfg.model.output_stride in (1, 2, 4, 8, 16, 32), "model.output_stride",
         cfg.model.output_stride, "one of 1, 2, 4, 8, 16, 32")
  _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", cfg.model.dtype,
         "'float32' or 'bfloat16'")
  _check(cfg.weighting.name in weighting.names(), "weighting.name", cfg.weighting.name,
         f"one of {weighting.names()}")
  try:
    weighting.get(cfg.weighting.name, **weighting_kwargs(cfg))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.weighting: {e}") from e
  _check(cfg.meta_split in ("train", "validation"), "meta_split", cfg.meta_split,
         "'train' or 'validation' (where Auto-Lambda's meta batches come from)")
  _check(cfg.grad_level in GRAD_LEVELS, "grad_level", cfg.grad_level, f"one of {GRAD_LEVELS}")
  opt = cfg.optimizer
  _check(opt.name in optim.OPTIMIZERS, "optimizer.name", opt.name, f"one of {optim.OPTIMIZERS}")
  _check(opt.schedule in optim.SCHEDULES, "optimizer.schedule", opt.schedule,
         f"one of {optim.SCHEDULES}")
  _check(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "> 0")
  for field in ("batch_size", "eval_batch_size"):
    value = cfg[field]
    _check(isinstance(value, int) and value > 0 and value % num_devices == 0, field, value,
           f"a positive multiple of the number of devices ({num_devices})")
  for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
    _check(isinstance(cfg[field], int) and cfg[field] >= 0, field, cfg[field], "an int >= 0")
  for name, metrics in cfg.baselines.items():
    _check(name in names, f"baselines.{name}", name, f"one of the config's tasks {names}")
    allowed = tasks.get(name, info["num_classes"]).higher_is_better
    for metric in metrics:
      _check(metric in allowed, f"baselines.{name}.{metric}", metric,
             f"one of {sorted(allowed)}")


def identity(cfg) -> dict:
  """The fields that define a run's trajectory (all but :data:`PRESENTATION_FIELDS`)."""
  flat = _flatten(cfg.to_dict())
  return {k: v for k, v in flat.items()
          if not any(k == f or k.startswith(f + ".") for f in PRESENTATION_FIELDS)}


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


# Trailing shape of each dense label key (after batch, height, width).
_DENSE_LABELS = {"segmentation": (), "depth": (), "depth_valid": (), "normals": (3,),
                 "instances": ()}


def check_batch(cfg, batch, num_classes: int, batch_size: int) -> None:
  """Raises ValueError when ``batch`` does not have the shapes ``cfg`` implies."""
  height, width = tuple(cfg.dataset.image_size)
  keys = data.dataset_info(cfg.dataset.name)["tasks"]
  expected = {"image": (batch_size, height, width, 3)}
  for name in cfg.tasks:
    for key in keys[name]:
      if key in _DENSE_LABELS:
        expected[key] = (batch_size, height, width, *_DENSE_LABELS[key])
      elif key == "labels":
        expected[key] = (batch_size, num_classes - 1)
  for key, shape in expected.items():
    if key not in batch:
      raise ValueError(f"batch: missing {key!r}, needed by config.tasks {tuple(cfg.tasks)}")
    if tuple(batch[key].shape) != shape:
      raise ValueError(f"batch[{key!r}]: shape {tuple(batch[key].shape)} does not match the "
                       f"config (batch_size, dataset.image_size, classes): expected {shape}")
