"""A config resolved once into a typed, frozen run plan (:class:`Run`).

``resolve(config)`` is where the ``ml_collections`` config is read: every check of a field
runs here, before anything is compiled, and a bad value raises :class:`mtjax.errors.UserError`
naming ``config.<field>`` (the builders' own checks included: the model's, the weighting
method's ``init``, the optimizer's groups, the strategy, the data pipeline's). Below the plan
(:mod:`mtjax.train.loop`, :mod:`mtjax.train.trainer`, :mod:`mtjax.train.inputs`,
:mod:`mtjax.train.sinks`) modules receive these typed values, never the config, as
big_vision's ``train.py`` resolves its config at the top and hands plain values down.

    run = setup.resolve(config)
    trainer = trainer_lib.make_trainer(*run.experiment[:4], run.step_options, mesh=run.mesh)
"""

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax import config as config_lib
from mtjax import data as data_lib
from mtjax import models, relations, weighting
from mtjax import tasks as tasks_lib
from mtjax.data import augment, pipeline
from mtjax.errors import UserError
from mtjax.models import labels, pretrained
from mtjax.train import inputs as inputs_lib
from mtjax.train import mesh as mesh_lib
from mtjax.train import meta as meta_lib
from mtjax.train import optim, strategies
from mtjax.train import step as step_lib
from mtjax.train import trainer as trainer_lib
from mtjax.train.periods import Periods

# Methods whose direction (nearly) vanishes on a step with a masked task, measured by
# benchmarks/masked_task.py: MGDA's min-norm point of a hull that holds 0 is 0; FAMO's and GLS's
# weights grow as 1 / loss, so a loss of 0 takes all of it. The run warns (several datasets).
MASKED_STEP_VANISHES = ("mgda", "famo", "gls")


class Experiment(NamedTuple):
  """Everything a config builds, before any compilation."""

  model: object
  tasks: dict
  method: object
  optimizer: object
  schedule: object
  label_keys: tuple


class DatasetEntry(NamedTuple):
  """One dataset of the run: ``config.dataset`` (key ``"dataset"``) or an entry of
  ``config.datasets``, its missing fields taken from ``config.dataset``."""

  key: str
  name: str
  tasks: tuple             # the tasks it labels
  data_dir: str
  split_sizes: tuple       # ((split, size), ...)
  augment: tuple
  field: str               # its config path, for errors


class Inputs(NamedTuple):
  """How the run reads its data (every field checked)."""

  entries: tuple           # (DatasetEntry, ...): one dataset is a mixture of one
  image_size: tuple
  batch_size: int          # the global batch
  eval_batch_size: int
  seed: int
  sampler: str             # which dataset a step draws from (several datasets)
  loader: str
  num_workers: int
  transforms: tuple        # each entry's augmentation (mtjax.data.augment.compose)
  meta_split: str          # where a meta-level method's batches come from
  class_names: dict        # {task: the class names of the dataset that labels it}
  num_classes: dict        # {task: its class count (0: not a classification of pixels)}


class Run(NamedTuple):
  """A resolved config: what :func:`mtjax.train.loop.train` and ``evaluate`` read."""

  experiment: Experiment
  mesh: object
  inputs: Inputs
  step_options: trainer_lib.StepOptions
  periods: Periods
  seed: int
  method_name: str
  nonfinite: str
  max_consecutive_skips: int
  pretrained: str          # a backbone (or whole model) file for a fresh run, or ""
  architecture: str        # config.model.architecture (how a pretrained file maps onto it)
  keep_checkpoints: int
  prediction_images: int
  tensorboard: bool
  baselines: dict          # {task: {metric: value}}
  conflict_threshold: float  # a pair of tasks conflicts below this cosine (logged fraction)
  identity: dict           # the fields that define the trajectory (mtjax.config.identity)
  config: dict             # the whole config, as config.json holds it


@contextlib.contextmanager
def building(field: str | None = None):
  """Re-raises a builder's ValueError as a UserError of ``config.<field>`` (or ``config.``)."""
  try:
    yield
  except UserError:
    raise
  except (TypeError, ValueError) as e:
    raise UserError(f"config.{field}: {e}" if field else f"config.{e}") from None


def make_mesh(cfg):
  """The device mesh of ``config.mesh`` (``{"data": d, "fsdp": f}``; default: data only)."""
  with building():
    shape = cfg.get("mesh", None)
    return mesh_lib.make_mesh(shape=shape.to_dict() if hasattr(shape, "to_dict") else shape)


def build(cfg) -> Experiment:
  """Model, tasks, weighting method and optimizer of a config; each builder checks its fields."""
  options = config_lib.task_options(cfg)
  tasks = {name: tasks_lib.get(name, **options[name]) for name in cfg.tasks}
  check_evaluators(tasks)
  with building():
    model = models.build(cfg.model.backbone, tasks, **config_lib.model_kwargs(cfg))
  if cfg.model.get("pretrained", ""):
    with building():
      pretrained.check_path(cfg.model.pretrained)
      shapes = _shapes(model, cfg)  # the file against the model, before anything compiles
      pretrained.load(model, shapes["params"], shapes.get("batch_stats", {}),
                      cfg.model.pretrained, cfg.model.get("architecture", "hard"))
  with building("weighting.name"):
    weighting.hparams(cfg.weighting.name)
  with building("weighting"):
    method = weighting.get(cfg.weighting.name, **config_lib.weighting_kwargs(cfg))
  with building():
    meta_lib.check_meta_split(method, cfg.meta_split)
  with building():
    spec = optimizer_spec(cfg)
    if any(optim.group_rules(spec)):  # the groups cost a trace of the model
      optim.check_groups(spec, _groups(model, cfg))
    strategy = cfg.get("strategy", "end_to_end")
    strategies.check(strategy, cfg.get("phases", None), tuple(cfg.tasks), method.level)
    make = optim.make_optimizer if strategy == "end_to_end" else optim.make_grouped_optimizer
    optimizer = make(spec, cfg.num_steps, functools.partial(labels.label_tree, model))
    schedule = optim.make_schedule(spec, cfg.num_steps)
  label_keys = tuple(dict.fromkeys(k for task in tasks.values()
                                   for k in tasks_lib.label_keys(task)))
  return Experiment(model, tasks, method, optimizer, schedule, label_keys)


def check_evaluators(tasks) -> None:
  """Raises a :class:`UserError` of ``config.tasks`` when a task's host-side evaluator misses
  its library (the detection task's faster-coco-eval): before training, not at the first
  evaluation."""
  for name, task in tasks.items():
    if task.evaluator is not None and task.evaluator.check is not None:
      try:
        task.evaluator.check()
      except ImportError as e:
        raise UserError(f"config.tasks: task {name!r}: {e}") from None


def optimizer_spec(cfg) -> optim.OptimizerSpec:
  """``config.optimizer`` as an :class:`mtjax.train.optim.OptimizerSpec`, with the backbone's
  BatchNorm group ``"shared/bn"`` frozen when ``config.model.frozen_bn`` is set; absent
  optional fields (``step_size``, ``gamma``, ``lr_scale``, ``frozen``) take the spec's
  defaults."""
  opt = cfg.optimizer
  defaults = optim.OptimizerSpec._field_defaults
  frozen = tuple(opt.get("frozen", None) or ())
  if cfg.model.get("frozen_bn", False):
    frozen = (*frozen, f"{labels.SHARED}/bn")
  return optim.OptimizerSpec(
      name=opt.name, learning_rate=opt.learning_rate, schedule=opt.schedule,
      **{f: opt.get(f, defaults[f]) for f in ("warmup_steps", "momentum", "weight_decay",
                                              "grad_clip", "step_size", "gamma")},
      lr_scale=tuple(dict(opt.get("lr_scale", None) or ()).items()), frozen=frozen)


def _shapes(model, cfg):
  """The variables of ``model`` as shapes (nothing is computed)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, *cfg.dataset.image_size, 3)),
                                           train=False))


def _groups(model, cfg) -> list[str]:
  """The parameter groups of ``model`` (shapes only: nothing is computed)."""
  return labels.groups(model, _shapes(model, cfg)["params"])


def _relations(cfg) -> dict:
  """``config.relations`` checked: ``{conflict, conflict_level, affinity_every, affinity_lr,
  conflict_threshold}`` (absent: conflict at logging steps at the automatic level, PCGrad's
  threshold, no affinity)."""
  rel = dict(cfg.get("relations", None) or {})
  unknown = sorted(set(rel) - {"conflict", "conflict_level", "affinity_every", "affinity_lr",
                                "conflict_threshold"})
  if unknown:
    raise ValueError(f"relations: unknown field(s) {unknown}; expected conflict, "
                     "conflict_level, conflict_threshold, affinity_every, affinity_lr")
  threshold = relations.conflict_threshold(rel)
  conflict = rel.get("conflict", True)
  if not isinstance(conflict, bool):
    raise ValueError(f"relations.conflict: got {conflict!r}; expected a bool")
  level = rel.get("conflict_level", "auto")
  if level not in step_lib.CONFLICT_LEVELS:
    raise ValueError(f"relations.conflict_level: got {level!r}; expected one of "
                     f"{step_lib.CONFLICT_LEVELS}")
  every = rel.get("affinity_every", 0)
  if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
    raise ValueError(f"relations.affinity_every: got {every!r}; expected an int >= 0 (0: off)")
  lr = rel.get("affinity_lr", 0.0)
  if not (isinstance(lr, (int, float)) and lr >= 0):
    raise ValueError(f"relations.affinity_lr: got {lr!r}; expected a number >= 0 (0: the "
                     "optimizer's learning rate at the step)")
  return {"conflict": conflict, "conflict_level": level, "affinity_every": every,
          "affinity_lr": float(lr) if lr else None, "conflict_threshold": threshold}


def periods(cfg) -> Periods:
  """The run's :class:`Periods` (``config.relations`` checked)."""
  with building():
    rel = _relations(cfg)
  return Periods(cfg.num_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every,
                 cfg.log_every if rel["conflict"] else 0, rel["affinity_every"])


def step_options(cfg, exp: Experiment) -> trainer_lib.StepOptions:
  """The :class:`mtjax.train.trainer.StepOptions` of a config."""
  with building():
    rel = _relations(cfg)
  strategy = cfg.get("strategy", "end_to_end")
  sched = periods(cfg)
  default = trainer_lib.StepOptions()
  return trainer_lib.StepOptions(
      image_shape=(*cfg.dataset.image_size, 3), batch_size=cfg.batch_size,
      grad_level=cfg.grad_level, frozen=optimizer_spec(cfg).frozen,
      lookahead_lr=exp.schedule, nonfinite=cfg.get("nonfinite", default.nonfinite),
      max_consecutive_skips=cfg.get("max_consecutive_skips", default.max_consecutive_skips),
      task_chunk=cfg.get("task_chunk", 0), conflict_every=sched.conflict,
      last_step=cfg.num_steps, conflict_level=rel["conflict_level"],
      affinity_every=sched.affinity, affinity_lr=rel["affinity_lr"],
      phase_at=None if strategy == "end_to_end" else functools.partial(
          strategies.phase_at, strategy, strategies.options(cfg.get("phases", None)),
          tuple(cfg.tasks)))


def make_trainer(cfg, exp: Experiment, mesh, options=None):
  """The experiment's :class:`mtjax.train.trainer.Trainer` (its checks name the config
  field); ``options``: :func:`step_options` of ``cfg`` if already made."""
  options = step_options(cfg, exp) if options is None else options
  with building():
    return trainer_lib.make_trainer(exp.model, exp.tasks, exp.method, exp.optimizer, options,
                                    mesh=mesh)


def entries(cfg) -> tuple:
  """The run's :class:`DatasetEntry` values (:func:`mtjax.config.dataset_entries`)."""
  return tuple(DatasetEntry(key, e["name"], tuple(e["tasks"]), e["data_dir"] or "",
                            tuple(sorted(dict(e["split_sizes"]).items())), tuple(e["augment"]),
                            e["field"])
               for key, e in config_lib.dataset_entries(cfg).items())


def inputs(cfg, tasks) -> Inputs:
  """The run's :class:`Inputs`: the datasets, their augmentations (which transform the labels
  of ``tasks``, ``{name: Task}``) and the loader, checked."""
  found = entries(cfg)
  transforms = []
  for entry in found:
    with building(f"{entry.field}.augment"):
      transforms.append(augment.compose(entry.augment, tasks.values()))
  loader = cfg.dataset.get("loader", "threads")
  with building("dataset.loader"):
    if loader not in pipeline.LOADERS:
      raise ValueError(f"got {loader!r}, allowed: {list(pipeline.LOADERS)}")
    if len(found) > 1 and loader != "threads":
      raise ValueError(f"got {loader!r}; several datasets (config.datasets) are "
                       "read by the 'threads' loader (config.dataset.num_workers threads)")
    if loader != "threads":
      pipeline.grain_module()
  labelled_by = {task: entry.name for entry in reversed(found) for task in entry.tasks}
  class_names = {task: tuple(data_lib.dataset_info(labelled_by[task]).get("class_names", ())
                             or ()) for task in cfg.tasks}
  options = config_lib.task_options(cfg)
  num_classes = {task: options.get(task, {}).get("num_classes", 0) or 0 for task in cfg.tasks}
  return Inputs(found, tuple(cfg.dataset.image_size), cfg.batch_size, cfg.eval_batch_size,
                cfg.seed, cfg.get("dataset_sampler", "proportional"), loader,
                cfg.dataset.get("num_workers", 0), tuple(transforms), cfg.meta_split,
                class_names, num_classes)


def check_method_state(exp: Experiment, options) -> None:
  """The model's ``init`` and the weighting method's ``init`` on the shapes of this run
  (nothing computed): a model that refuses the image size (SegNet: multiples of 32) is a
  ``config.<field>`` error it names, a method that refuses the tasks (a ``fixed`` weighting
  with the wrong number of weights) a ``config.weighting`` error, before anything is
  compiled."""
  model = exp.model
  with building():  # a model's own checks of the input (e.g. SegNet's image size)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *options.image_shape)), train=False))
    like = jax.eval_shape(lambda: trainer_lib.gradient_like(
        model, variables["params"], variables.get("batch_stats", {}),
        grad_level=options.grad_level, image_shape=options.image_shape,
        batch_size=options.batch_size))
  try:
    jax.eval_shape(lambda g: exp.method.init(len(exp.tasks), g), like)
  except ValueError as e:
    raise UserError(f"config.weighting: {e}") from None
  except Exception:  # noqa: BLE001,S110 -- an init that cannot be traced runs at trainer.init
    pass


def resolve(cfg) -> Run:
  """The :class:`Run` of ``cfg``: every field checked (UserError naming ``config.<field>``),
  nothing compiled."""
  mesh = make_mesh(cfg)
  config_lib.validate(cfg, mesh.size)
  exp = build(cfg)
  options = step_options(cfg, exp)
  with building():
    trainer_lib.check_options(exp.model, exp.method, options, mesh)
  check_method_state(exp, options)
  found = inputs(cfg, exp.tasks)
  return Run(
      experiment=exp, mesh=mesh, inputs=found, step_options=options, periods=periods(cfg),
      seed=cfg.seed, method_name=cfg.weighting.name, nonfinite=options.nonfinite,
      max_consecutive_skips=options.max_consecutive_skips,
      pretrained=cfg.model.get("pretrained", "") or "",
      architecture=cfg.model.get("architecture", "hard"),
      keep_checkpoints=cfg.keep_checkpoints, prediction_images=cfg.get("prediction_images", 0),
      tensorboard=cfg.get("tensorboard", False),
      baselines={t: dict(m) for t, m in cfg.baselines.items()},
      conflict_threshold=_relations(cfg)["conflict_threshold"],
      identity=config_lib.identity(cfg), config=cfg.to_dict())


def load_data(cfg, split: str, label_keys, entry: DatasetEntry | None = None):
  """The arrays (or lazy source) of ``split`` of ``config.dataset`` (or ``entry``) with
  ``label_keys``: :func:`mtjax.train.inputs.read_split` for a config."""
  entry = entries(cfg)[0] if entry is None else entry
  return inputs_lib.read_split(entry, split, label_keys, tuple(cfg.dataset.image_size))
