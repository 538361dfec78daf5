"""Experiment configs: the checks that span several fields, and a run's identity.

Every check happens before anything is compiled; each error names the config field, what it
got and what is allowed.
"""

import importlib.util
import os

import ml_collections

from mtjax import data, models, tasks, weighting
from mtjax.data import mixing
from mtjax.errors import UserError

# Fields that change what is logged or saved, or where it runs (``mesh``: the same trajectory to
# float32 noise), not the training trajectory: a workdir's checkpoint may be resumed under a
# config that differs only in these (a sharded checkpoint restores onto another mesh).
PRESENTATION_FIELDS = ("log_every", "eval_every", "checkpoint_every", "eval_batch_size",
                       "baselines", "dataset.data_dir", "progress_bar", "keep_checkpoints",
                       "dataset.num_workers", "dataset.loader",  # the same batches either way
                       "mesh", "relations", "prediction_images", "tensorboard",
                       # XLA's deterministic GPU kernels and the compile cache: the same
                       # trajectory (bitwise on CPU either way)
                       "deterministic", "compilation_cache")


def weighting_config(name: str = "ew") -> ml_collections.ConfigDict:
  """``{"name": name, <each hyperparameter>: <its default>}`` for a config file.

  Raises :class:`UserError` listing the valid names when ``name`` is not a method (the argument
  after ``:`` in ``--config FILE:METHOD``).
  """
  if name not in weighting.names():
    raise UserError(f"config.weighting.name: got {name!r} (the method after ':' in --config); "
                    f"expected one of {weighting.names()}")
  fields = {"name": name}
  for key, value in weighting.hparams(name).items():
    # A None default (e.g. fixed weights, a preference vector) stands for an optional tuple:
    # typed, so that `--config.weighting.weights='(1., 2., 1.)'` can set it.
    fields[key] = ml_collections.FieldReference(None, field_type=tuple) if value is None else value
  return ml_collections.ConfigDict(fields)


def model_config(architecture: str = "hard", **fields) -> ml_collections.ConfigDict:
  """``{"architecture": ..., <common fields>, <each hyperparameter>: <its default>}``.

  ``fields``: the common ``config.model`` fields (backbone, width, output_stride, stem,
  head_hidden, dtype). The architecture's hyperparameters come from its builder's defaults
  (:func:`mtjax.models.hparams`, one source of truth). Raises :class:`UserError` naming
  ``config.model.architecture`` for an unknown architecture.
  """
  try:
    extra = models.hparams(architecture)
  except ValueError as e:
    raise UserError(f"config.{e}") from None
  for key, value in extra.items():  # a None default stands for an optional tuple, as above
    if value is None:
      extra[key] = ml_collections.FieldReference(None, field_type=tuple)
  return ml_collections.ConfigDict({"architecture": architecture, **fields, **extra})


def model_kwargs(cfg) -> dict:
  """The keyword arguments of :func:`mtjax.models.build` in ``config.model`` (all but the
  backbone's name and ``pretrained``, which the loop loads); a config without ``architecture``
  is ``"hard"``."""
  return {k: v for k, v in cfg.model.items() if k not in ("backbone", "pretrained")}


def weighting_kwargs(cfg) -> dict:
  """The hyperparameters of ``config.weighting`` (everything but its name)."""
  return {k: v for k, v in cfg.weighting.items() if k != "name"}


def _check(ok: bool, field: str, got, allowed):
  if not ok:
    raise UserError(f"config.{field}: got {got!r}; expected {allowed}")


# Fields of an entry of ``config.datasets``; all but ``tasks`` default to ``config.dataset``'s.
DATASET_ENTRY_FIELDS = ("name", "tasks", "data_dir", "split_sizes", "augment")


def several_datasets(cfg) -> bool:
  """Whether the run draws from several datasets (a non-empty ``config.datasets``)."""
  return bool(cfg.get("datasets", None))


def dataset_entries(cfg) -> dict:
  """``{key: dataset}`` of the run, each a dict with ``name``, ``tasks`` (those it labels),
  ``data_dir``, ``split_sizes``, ``augment``, ``image_size`` and ``field`` (its config path, for
  errors): the entries of ``config.datasets``, their missing fields taken from ``config.dataset``;
  without ``config.datasets``, the one entry ``config.dataset`` labelling ``config.tasks``."""
  base = {"name": cfg.dataset.get("name", ""), "data_dir": cfg.dataset.get("data_dir", ""),
          "split_sizes": dict(cfg.dataset.get("split_sizes", None) or {}),
          "augment": tuple(cfg.dataset.get("augment", ())),
          "image_size": tuple(cfg.dataset.image_size)}
  if not several_datasets(cfg):
    return {"dataset": {**base, "tasks": tuple(cfg.tasks), "field": "dataset"}}
  out = {}
  for key, entry in cfg.datasets.items():
    entry = dict(entry) if hasattr(entry, "items") else entry
    _check(isinstance(entry, dict), f"datasets.{key}", entry,
           f"a dict with fields {list(DATASET_ENTRY_FIELDS)} ('tasks' required)")
    unknown = sorted(set(entry) - set(DATASET_ENTRY_FIELDS))
    _check(not unknown, f"datasets.{key}", unknown,
           f"fields from {list(DATASET_ENTRY_FIELDS)} (image_size, loader and num_workers are "
           "config.dataset's, common to all)")
    item = {**base, **{k: v for k, v in entry.items() if k != "tasks"},
            "tasks": entry.get("tasks", None), "field": f"datasets.{key}"}
    item["split_sizes"] = dict(item["split_sizes"] or {})
    item["augment"] = tuple(item["augment"] or ())
    out[key] = item
  return out


def task_options(cfg) -> dict:
  """``{task: options}`` (class counts) of ``config.tasks`` from the dataset(s) labelling each."""
  out = {}
  for entry in dataset_entries(cfg).values():
    info = data.dataset_info(entry["name"])["tasks"]
    for task in entry["tasks"]:
      if task in info:
        out.setdefault(task, info[task])
  return {task: out[task] for task in cfg.tasks if task in out}


def _check_datasets(cfg, names) -> None:
  """The entries of ``config.datasets`` against the registry and ``config.tasks``."""
  _check(hasattr(cfg.datasets, "items"), "datasets", cfg.datasets,
         "a dict {key: {name, tasks, ...}} (empty: the one config.dataset)")
  sampler = cfg.get("dataset_sampler", "proportional")
  _check(sampler in mixing.SAMPLERS, "dataset_sampler", sampler,
         f"one of {list(mixing.SAMPLERS)} (which dataset each step draws from)")
  first = {}
  for entry in dataset_entries(cfg).values():
    field = entry["field"]
    try:
      info = data.dataset_info(entry["name"])
    except ValueError as e:
      raise UserError(f"config.{field}.{e}") from None
    labelled = entry["tasks"]
    _check(isinstance(labelled, (tuple, list)) and len(labelled) > 0
           and len(set(labelled)) == len(labelled), f"{field}.tasks", labelled,
           "a non-empty tuple of distinct task names (the tasks this dataset labels)")
    for task in labelled:
      _check(task in names, f"{field}.tasks", task, f"tasks of config.tasks {names}")
      _check(task in info["tasks"], f"{field}.tasks", task,
             f"tasks that dataset {entry['name']!r} labels: {sorted(info['tasks'])}")
      options = info["tasks"][task]
      if task in first and first[task][1] != options:
        raise UserError(f"config.{field}.tasks: task {task!r} has options {options} in dataset "
                        f"{entry['name']!r} but {first[task][1]} in config.{first[task][0]}; "
                        "expected the same (one head per task)")
      first.setdefault(task, (field, options))
  missing = [t for t in names if t not in first]
  _check(not missing, "datasets", missing,
         f"every task of config.tasks labelled by at least one dataset; {missing} is not")


def validate(cfg, num_devices: int = 1) -> None:
  """Raises :class:`UserError` (a ValueError) naming the first bad field among those that span
  several builders.

  The fields of one builder (model, weighting method, optimizer, gradient level) are checked
  by that builder (see ``mtjax.train.setup.build``), with errors naming the field.
  """
  if not several_datasets(cfg):
    try:
      info = data.dataset_info(cfg.dataset.name)
    except ValueError as e:
      raise UserError(f"config.dataset.{e}") from None
  size = tuple(cfg.dataset.image_size)
  _check(len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size),
         "dataset.image_size", size, "(height, width), ints >= 8")
  names = tuple(cfg.tasks)
  _check(len(names) > 0 and len(set(names)) == len(names), "tasks", names,
         "a non-empty tuple of distinct task names")
  if several_datasets(cfg):
    _check_datasets(cfg, names)
    info = {"tasks": task_options(cfg)}
  for name in names:
    _check(name in tasks.names() or "kind" in info["tasks"].get(name, {}), "tasks", name,
           f"task names from {tasks.names()}")
    _check(name in info["tasks"], "tasks", name,
           f"tasks that dataset {cfg.dataset.name!r} labels: {sorted(info['tasks'])}")
  _check(cfg.meta_split in ("train", "validation"), "meta_split", cfg.meta_split,
         "'train' or 'validation' (where Auto-Lambda's meta batches come from)")
  for field in ("batch_size", "eval_batch_size"):
    value = cfg[field]
    _check(isinstance(value, int) and value > 0 and value % num_devices == 0, field, value,
           f"a positive multiple of the number of devices ({num_devices})")
  for field in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
    _check(isinstance(cfg[field], int) and cfg[field] >= 0, field, cfg[field], "an int >= 0")
  images = cfg.get("prediction_images", 0)
  _check(isinstance(images, int) and not isinstance(images, bool) and images >= 0,
         "prediction_images", images, "an int >= 0 (validation examples drawn at each "
         "evaluation; 0: none)")
  _check(isinstance(cfg.get("tensorboard", False), bool), "tensorboard",
         cfg.get("tensorboard"), "a bool (TensorBoard event files through tensorboardX)")
  # A baseline of a task the dataset labels but the run does not train is not used (Δm% reads
  # the run's tasks): a single-task row runs under its multi-task config as it is.
  for name, metrics in cfg.baselines.items():
    _check(name in info["tasks"], f"baselines.{name}", name,
           f"a task of the dataset's {sorted(info['tasks'])}")
    allowed = tasks.get(name, **info["tasks"][name]).higher_is_better
    for metric in metrics:
      _check(metric in allowed, f"baselines.{name}.{metric}", metric,
             f"one of {sorted(allowed)}")


def identity(cfg) -> dict:
  """The fields that define a run's trajectory (all but :data:`PRESENTATION_FIELDS`, and the
  ``data_dir`` of each entry of ``config.datasets``)."""
  flat = _flatten(cfg.to_dict())
  return {k: v for k, v in flat.items()
          if not any(k == f or k.startswith(f + ".") for f in PRESENTATION_FIELDS)
          and not (k.startswith("datasets.") and k.endswith(".data_dir"))}


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = _as_json(value)
  return out


def _as_json(value):
  """``value`` as it reads back from JSON (tuples, also nested ones, become lists)."""
  if isinstance(value, (tuple, list)):
    return [_as_json(v) for v in value]
  return value


def sibling_config(config_file: str, name: str, arg=None):
  """``get_config(arg)`` of the config file ``name`` beside ``config_file`` (an experiment's
  config builds on another, e.g. ``shapes.py``, the default experiment's: every field the loop
  reads, with its default)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f"mtjax_config_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
