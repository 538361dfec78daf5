"""The training loop: validate, build, resume, train, evaluate, checkpoint, report.

``train(config, workdir)`` is what ``mtjax train`` runs. The workdir holds ``config.json``,
``checkpoints/`` (orbax), ``metrics.jsonl`` (one JSON object a logging or evaluation step),
``predictions/step_<N>.png`` at each evaluation (:mod:`mtjax.train.figures`), TensorBoard event
files if ``config.tensorboard``, and at the end ``results.json``, ``results.md``,
``curves.png`` and ``relations.png``.
"""

import contextlib
import functools
import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import checkpoint, data, metrics, models, relations, runtime, weighting
from mtjax import config as config_lib
from mtjax import tasks as tasks_lib
from mtjax.data import augment, mixing, pipeline, sources
from mtjax.errors import RunError, UserError
from mtjax.models import labels, pretrained
from mtjax.tasks import detection_plot
from mtjax.train import figures, optim, strategies
from mtjax.train import step as step_lib
from mtjax.train import trainer as trainer_lib
from mtjax.train.figures import plot_curves


class Experiment(NamedTuple):
  """Everything a config builds, before any compilation."""

  model: object
  tasks: dict
  method: object
  optimizer: object
  schedule: object
  label_keys: tuple


@contextlib.contextmanager
def _building(field: str | None = None):
  """Re-raises a builder's ValueError as a UserError of ``config.<field>`` (or ``config.``)."""
  try:
    yield
  except UserError:
    raise
  except (TypeError, ValueError) as e:
    raise UserError(f"config.{field}: {e}" if field else f"config.{e}") from None


def build(cfg) -> Experiment:
  """Model, tasks, weighting method and optimizer of a config; each builder checks its fields."""
  options = config_lib.task_options(cfg)
  tasks = {name: tasks_lib.get(name, **options[name]) for name in cfg.tasks}
  check_evaluators(tasks)
  with _building():
    model = models.build(cfg.model.backbone, tasks, **config_lib.model_kwargs(cfg))
  if cfg.model.get("pretrained", ""):
    with _building():
      pretrained.check_path(cfg.model.pretrained)
      shapes = _shapes(model, cfg)  # the file against the model, before anything compiles
      pretrained.load(model, shapes["params"], shapes.get("batch_stats", {}),
                      cfg.model.pretrained, cfg.model.get("architecture", "hard"))
  with _building("weighting.name"):
    weighting.hparams(cfg.weighting.name)
  with _building("weighting"):
    method = weighting.get(cfg.weighting.name, **config_lib.weighting_kwargs(cfg))
  with _building():
    if any(optim.group_rules(cfg.optimizer)):  # the groups cost a trace of the model
      optim.check_groups(cfg.optimizer, _groups(model, cfg))
    strategy = cfg.get("strategy", "end_to_end")
    strategies.check(strategy, cfg.get("phases", None), tuple(cfg.tasks), method.level)
    make = optim.make_optimizer if strategy == "end_to_end" else optim.make_grouped_optimizer
    optimizer = make(optimizer_config(cfg), cfg.num_steps,
                     functools.partial(labels.label_tree, model))
    schedule = optim.make_schedule(cfg.optimizer, cfg.num_steps)
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


def optimizer_config(cfg):
  """``config.optimizer``, with the backbone's BatchNorm group ``"shared/bn"`` frozen when
  ``config.model.frozen_bn`` is set."""
  if not cfg.model.get("frozen_bn", False):
    return cfg.optimizer
  opt = cfg.optimizer.copy_and_resolve_references()
  opt.frozen = (*optim.group_rules(cfg.optimizer)[1], f"{labels.SHARED}/bn")
  return opt


def _shapes(model, cfg):
  """The variables of ``model`` as shapes (nothing is computed)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, *cfg.dataset.image_size, 3)),
                                           train=False))


def _groups(model, cfg) -> list[str]:
  """The parameter groups of ``model`` (shapes only: nothing is computed)."""
  return labels.groups(model, _shapes(model, cfg)["params"])


def make_trainer(cfg, exp: Experiment, mesh, relation_args: dict | None = None):
  """The experiment's :class:`mtjax.train.trainer.Trainer` (checks ``config.grad_level``);
  ``relation_args``: :func:`_relations_and_phases` of ``cfg`` if already read."""
  with _building():
    if relation_args is None:
      relation_args = _relations_and_phases(cfg)
    return trainer_lib.make_trainer(
        exp.model, exp.tasks, exp.method, exp.optimizer, image_shape=(*cfg.dataset.image_size, 3),
        batch_size=cfg.batch_size, grad_level=cfg.grad_level, frozen=optim.group_rules(
            optimizer_config(cfg))[1], lookahead_lr=exp.schedule, mesh=mesh,
        nonfinite=cfg.get("nonfinite", "stop"),
        max_consecutive_skips=cfg.get("max_consecutive_skips", 10),
        task_chunk=cfg.get("task_chunk", 0), **relation_args)


def _relations_and_phases(cfg) -> dict:
  """The trainer's relation and strategy arguments from ``config.relations`` and
  ``config.strategy`` / ``config.phases`` (absent: conflict at logging steps at the automatic
  level, no affinity, end to end)."""
  rel = dict(cfg.get("relations", None) or {})
  unknown = sorted(set(rel) - {"conflict", "conflict_level", "affinity_every", "affinity_lr",
                                "conflict_threshold"})
  if unknown:
    raise ValueError(f"relations: unknown field(s) {unknown}; expected conflict, "
                     "conflict_level, conflict_threshold, affinity_every, affinity_lr")
  relations.conflict_threshold(rel)
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
  strategy = cfg.get("strategy", "end_to_end")
  phases = cfg.get("phases", None)
  names = tuple(cfg.tasks)
  return {"conflict_every": cfg.log_every if conflict else 0, "last_step": cfg.num_steps,
          "conflict_level": level, "affinity_every": every,
          "affinity_lr": float(lr) if lr else None,
          "phase_at": None if strategy == "end_to_end" else functools.partial(
              strategies.phase_at, strategy, phases, names)}


def load_data(cfg, split: str, label_keys, entry: dict | None = None):
  """The arrays of ``split`` (built into the data dir first if needed), or for a dataset read
  lazily its :class:`mtjax.data.sources.Source`. ``entry``: one of
  :func:`mtjax.config.dataset_entries` (default: ``config.dataset``)."""
  if entry is None:
    entry = config_lib.dataset_entries(cfg)["dataset"]
  name, field = entry["name"], entry["field"]
  data_dir = entry["data_dir"] or None
  size = tuple(cfg.dataset.image_size)
  try:
    if jax.process_count() > 1:   # process 0 first: one builder for a shared data dir
      _after_process_zero(lambda: data.open_split(name, split, image_size=size,
                                                  data_dir=data_dir,
                                                  split_sizes=entry["split_sizes"]))
    # The keys the run reads are picked before anything is read; a small dataset is then read
    # whole, a large one (or one stored for lazy reading) batch by batch.
    source = pipeline.select(data.open_split(name, split, image_size=size, data_dir=data_dir,
                                             split_sizes=entry["split_sizes"]), label_keys)
    arrays = sources.read_all(source) if data.reads_whole(name, source) else source
  except OSError as e:
    if isinstance(e, FileNotFoundError) and e.filename is None:  # its message has the layout
      raise UserError(f"config.{field}.data_dir: {e}") from None
    where = data_dir or os.environ.get("MTJAX_DATA_DIR") or "~/tensorflow_datasets"
    raise UserError(
        f"config.{field}.data_dir (else $MTJAX_DATA_DIR): cannot build or read dataset "
        f"{name!r} in {where!r}: {e.strerror or e}"
        f"{f' ({e.filename})' if e.filename else ''}; expected a writable folder") from e
  except UserError:
    raise
  except ValueError as e:   # a field of config.dataset, or files that do not match the layout
    key = str(e).split(":")[0]
    where = {"image_size": "dataset.image_size", "split_sizes": f"{field}.split_sizes"}.get(
        key, f"{field}.data_dir")
    raise UserError(f"config.{where}: {str(e).removeprefix(key + ': ')}") from None
  return arrays


# Methods whose direction (nearly) vanishes on a step with a masked task, measured by
# benchmarks/masked_task.py: MGDA's min-norm point of a hull that holds 0 is 0; FAMO's and GLS's
# weights grow as 1 / loss, so a loss of 0 takes all of it. The loop warns (several datasets).
MASKED_STEP_VANISHES = ("mgda", "famo", "gls")


class Mixture(NamedTuple):
  """The datasets of ``config.datasets`` of one split, and the run's draws from them."""
  keys: tuple              # the entries' keys, in the config's order
  datasets: list           # [(data, labelled tasks), ...] (arrays or sources)
  label_specs: dict        # {task: task.label_spec(image_size)}
  transforms: list         # each dataset's augmentation
  steps: mixing.Plan       # the dataset and draw of each step of the run
  sampler: str

  def sizes(self) -> dict:
    return {k: pipeline.size(d) for k, (d, _) in zip(self.keys, self.datasets, strict=True)}

  def labelled(self):
    """Each dataset with every task's keys (its unlabelled tasks masked), for evaluation."""
    return [mixing.with_labels(d, t, self.label_specs) for d, t in self.datasets]


def load_mixture(cfg, split: str, exp: "Experiment", transforms=None) -> Mixture:
  """``split`` of every entry of ``config.datasets`` (each read with its own tasks' keys) and
  the :func:`mtjax.data.mixing.plan` of the run's steps."""
  entries = config_lib.dataset_entries(cfg)
  size = tuple(cfg.dataset.image_size)
  datasets = []
  for entry in entries.values():
    keys = tuple(dict.fromkeys(k for t in entry["tasks"]
                               for k in tasks_lib.label_keys(exp.tasks[t])))
    datasets.append((load_data(cfg, split, keys, entry), tuple(entry["tasks"])))
  sampler = cfg.get("dataset_sampler", "proportional")
  steps = mixing.plan([pipeline.size(d) for d, _ in datasets], sampler, seed=cfg.seed,
                      stop=max(cfg.num_steps, 1), num_steps=cfg.num_steps)
  return Mixture(tuple(entries), datasets,
                 {name: task.label_spec(size) for name, task in exp.tasks.items()},
                 list(transforms or [None] * len(datasets)), steps, sampler)


def mixture_batch(mix: Mixture, cfg, step: int, seed: int) -> dict:
  """This process's share of the batch of ``step`` drawn from ``mix``."""
  return mixing.mixed_batch(mix.datasets, seed=seed, step=step, batch_size=cfg.batch_size,
                            sampler=mix.sampler, num_steps=cfg.num_steps,
                            label_specs=mix.label_specs, transforms=mix.transforms,
                            steps=mix.steps, process_index=jax.process_index(),
                            process_count=jax.process_count())[1]


def check_mixture(mix: Mixture, cfg, exp) -> None:
  """Each dataset's first batch against the tasks, and the same layout (keys, shapes, dtypes)
  for all of them: one compiled step serves every dataset."""
  first, layout = None, None
  for k, key in enumerate(mix.keys):
    data_, labelled = mix.datasets[k]
    batch = mixing.complete_labels(pipeline.train_batch(
        data_, seed=cfg.seed, step=0, batch_size=cfg.batch_size, transform=mix.transforms[k]),
        labelled, mix.label_specs)
    try:
      tasks_lib.check_batch(exp.tasks, batch, cfg.dataset.image_size, cfg.batch_size)
    except ValueError as e:
      raise UserError(f"config.datasets.{key}: dataset "
                      f"{config_lib.dataset_entries(cfg)[key]['name']!r}: {e}") from None
    now = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    if layout is None:
      first, layout = key, now
    elif now != layout:
      diff = sorted(k for k in set(now) | set(layout) if now.get(k) != layout.get(k))
      raise UserError(
          f"config.datasets.{key}: its batches differ from those of config.datasets.{first} in "
          + ", ".join(f"{k} ({now.get(k)} vs {layout.get(k)})" for k in diff)
          + "; expected the same keys, shapes and dtypes (one compiled step for all datasets)")


def warn(message: str) -> None:
  """A one-line warning on stderr, as the command line prints its errors."""
  print(f"mtjax: warning: {message}", file=sys.stderr, flush=True)


def check_workdir(cfg, workdir: str) -> int | None:
  """The newest checkpoint step to resume from (None for a fresh run).

  Raises :class:`UserError` if ``workdir`` is not a folder, or if its checkpoint is of a
  different config. A checkpoint whose metadata cannot be read is passed over (and later moved
  aside by :func:`initial_state`).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir: {workdir!r} is a file; expected a folder (made if missing)")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in checkpoint.all_steps(ckpt_dir):
    try:
      saved = checkpoint.read_metadata(ckpt_dir, step)["config"]
    except Exception:  # noqa: BLE001 -- damaged: initial_state says so and moves it aside
      continue
    now = config_lib.identity(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
      details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff[:8])
      raise UserError(
          f"workdir {workdir!r} holds a checkpoint (step {step}) of a different config "
          f"({details}). Use another --workdir, or the config that wrote it; the checkpoint was "
          "left untouched.")
    return step
  return None


def initial_state(cfg, trainer, workdir: str, step: int | None, model=None):
  """A fresh state seeded by ``cfg.seed`` (its backbone from ``config.model.pretrained`` if
  set), or the newest readable checkpoint if ``step`` is set.

  A newer checkpoint that cannot be read is reported and moved aside
  (:func:`mtjax.checkpoint.restore_newest`).
  """
  state = trainer.init(jax.random.PRNGKey(cfg.seed))
  if step is None and cfg.model.get("pretrained", ""):
    with _building():
      params, stats = pretrained.load(model, state.params, state.batch_stats,
                                      cfg.model.pretrained,
                                      cfg.model.get("architecture", "hard"))
    state = state._replace(params=params, batch_stats=stats)
  if step is not None:
    state, _, _ = checkpoint.restore_newest(os.path.join(workdir, "checkpoints"), state,
                                            warn=warn)
  return state


def check_health(state, names, cfg, saved: int | None) -> None:
  """Raises :class:`RunError` if the run must stop at a non-finite step (``state.health``).

  Reads a few scalars: call it only where the loop syncs anyway (logging, evaluation,
  checkpoint, report). ``saved``: the step of the newest checkpoint on disk.
  """
  health = jax.device_get(state.health)
  bad_step = int(health.bad_step)
  if bad_step < 0:
    return
  what = []
  tasks = [n for n, bad in zip(names, np.asarray(health.bad_losses), strict=True) if bad]
  if tasks:
    what.append(f"the loss of {', '.join(tasks)}")
  if health.bad_grad:
    what.append("the gradient")
  if health.bad_params:
    what.append("the updated parameters")
  what = " and ".join(what) + (" was" if len(what) == 1 and not tasks[1:] else " were")
  on_disk = (f"the newest checkpoint (step {saved}) is finite" if saved is not None
             else "no checkpoint was saved")
  if cfg.get("nonfinite", "stop") == "skip":
    limit = cfg.get("max_consecutive_skips", 10)
    raise RunError(
        f"step {bad_step}: {limit} updates in a row were skipped (config.max_consecutive_skips), "
        f"the last because {what} not finite; {int(health.skipped)} skipped in all; {on_disk}. "
        "Lower config.optimizer.learning_rate or set config.optimizer.grad_clip")
  raise RunError(
      f"step {bad_step}: {what} not finite (config.nonfinite='stop'); the run stopped and "
      f"nothing after it was saved: {on_disk}. Lower config.optimizer.learning_rate, set "
      "config.optimizer.grad_clip, or skip such steps with config.nonfinite='skip'")


def evaluate_split(evaluate, state, arrays, tasks, batch_size, mesh) -> dict:
  """``{task: {metric: value}}`` over a whole split (padded batches are masked out).

  Sums come from the jitted ``evaluate``; tasks with a host-side evaluator also get its
  metrics, fed with their predictions batch by batch. ``arrays``: the split's data, or a list
  of the splits of several datasets with their unlabelled tasks masked
  (:meth:`Mixture.labelled`): each task is then measured on the examples that label it.
  """
  totals = None
  hosted = {name: task.evaluator for name, task in tasks.items() if task.evaluator is not None}
  host_states = {name: evaluator.init() for name, evaluator in hosted.items()}
  splits = arrays if isinstance(arrays, list) else [arrays]
  for batch in (b for split in splits for b in pipeline.eval_batches(split, batch_size)):
    sums, predictions = evaluate(state, _device_batch(batch, mesh))
    totals = metrics.accumulate(totals, sums)
    for name, evaluator in hosted.items():
      host_states[name] = evaluator.update(host_states[name],
                                           jax.device_get(predictions[name]), batch)
  results = metrics.summarize(tasks, totals)
  for name, evaluator in hosted.items():
    results[name].update(evaluator.result(host_states[name]))
  return results


def _after_process_zero(prepare) -> None:
  """Runs ``prepare()`` on process 0, then (after a barrier) on the other processes: hosts
  that share a data dir build a dataset once, instead of racing to rename the same folder."""
  from jax.experimental import multihost_utils
  error = None
  if _primary():
    try:
      prepare()
    except Exception as e:  # noqa: BLE001 -- raised after the barrier, which the others wait at
      error = e
  multihost_utils.sync_global_devices("mtjax: dataset prepared by process 0")
  if error is not None:
    raise error
  if not _primary():
    prepare()


def _primary() -> bool:
  """Whether this process writes the workdir's files (one host: always; several: process 0;
  orbax coordinates the checkpoints itself)."""
  return jax.process_index() == 0


def _device_batch(batch, mesh):
  """A global host batch on ``mesh``; on several hosts each process sends only its rows."""
  return step_lib.shard_batch(
      pipeline.process_slice(batch, jax.process_index(), jax.process_count()), mesh)


def make_mesh(cfg):
  """The device mesh of ``config.mesh`` (``{"data": d, "fsdp": f}``; default: data only)."""
  with _building():
    shape = cfg.get("mesh", None)
    return step_lib.make_mesh(shape=shape.to_dict() if hasattr(shape, "to_dict") else shape)


def _flat(results, prefix):
  return {f"{prefix}/{t}/{m}": v for t, values in results.items() for m, v in values.items()}


def log_record(step_metrics) -> dict:
  """A step's metrics as JSON values: scalars as floats, arrays (``conflict/cosine``,
  ``affinity``, ``relations/<name>``) as nested lists."""
  return {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()
          for k, v in jax.device_get(step_metrics).items()}


def _rewind_log(path: str, step: int) -> None:
  """Drops log lines written after ``step`` (by a run stopped before its next checkpoint), and a
  last line cut short by a kill."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        if line.endswith("\n") and json.loads(line)["step"] <= step:
          lines.append(line)
      except ValueError:
        pass
  with open(path, "w") as f:
    f.writelines(lines)


def train(cfg, workdir: str, *, progress: bool = True, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the experiment ``cfg`` in ``workdir``; returns the final results.

  ``stop_after`` ends the run after that many steps of this call (to test resuming).
  """
  mesh = make_mesh(cfg)
  config_lib.validate(cfg, mesh.size)
  exp = build(cfg)
  with _building():
    relation_args = _relations_and_phases(cfg)
  trainer = make_trainer(cfg, exp, mesh, relation_args)
  resume_step = check_workdir(cfg, workdir)
  entries = config_lib.dataset_entries(cfg)
  transforms = []
  for entry in entries.values():
    with _building(f"{entry['field']}.augment"):
      transforms.append(augment.compose(entry["augment"]))
  transform = transforms[0]
  several = config_lib.several_datasets(cfg)
  with _building("dataset.loader"):
    if cfg.dataset.get("loader", "threads") not in pipeline.LOADERS:
      raise ValueError(f"got {cfg.dataset.loader!r}, allowed: {list(pipeline.LOADERS)}")
    if several and cfg.dataset.get("loader", "threads") != "threads":
      raise ValueError(f"got {cfg.dataset.loader!r}; several datasets (config.datasets) are "
                       "read by the 'threads' loader (config.dataset.num_workers threads)")
    if cfg.dataset.get("loader", "threads") != "threads":
      pipeline.grain_module()
  data_kw = dict(seed=cfg.seed, batch_size=cfg.batch_size, transform=transform,
                 process_index=jax.process_index(), process_count=jax.process_count())
  if several and cfg.weighting.name in MASKED_STEP_VANISHES:
    warn(f"config.weighting.name: {cfg.weighting.name!r} puts (almost) all its weight on a "
         "task masked out of a step (loss 0, zero gradient), so the shared parameters barely "
         "move on the steps whose dataset does not label every task "
         "(benchmarks/results/masked_task.md)")
  if several:   # a Mixture per split; evaluation over each dataset, its unlabelled tasks masked
    mix = load_mixture(cfg, "train", exp, transforms)
    val_mix = load_mixture(cfg, "validation", exp, transforms)
    check_mixture(mix, cfg, exp)
    train_arrays, val_arrays = None, val_mix.labelled()
  else:
    train_arrays = load_data(cfg, "train", exp.label_keys)
    val_arrays = load_data(cfg, "validation", exp.label_keys)
    try:  # this process's share of the global batch
      tasks_lib.check_batch(exp.tasks, pipeline.train_batch(train_arrays, step=0, **data_kw),
                            cfg.dataset.image_size, cfg.batch_size // jax.process_count())
    except ValueError as e:
      raise UserError(f"dataset {cfg.dataset.name!r}: {e}") from None
  try:
    os.makedirs(workdir, exist_ok=True)
    if _primary():
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, default=list)
  except OSError as e:
    raise UserError(f"--workdir: cannot write to {workdir!r}: {e.strerror or e}") from e

  state = initial_state(cfg, trainer, workdir, resume_step, exp.model)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  log_path = os.path.join(workdir, "metrics.jsonl")
  saved = None
  if resume_step is not None:
    saved = int(state.step)
    if _primary():
      _rewind_log(log_path, saved)
  elif os.path.exists(log_path) and _primary():
    os.remove(log_path)
  if exp.method.level == "meta" and several:
    meta_mix = mix if cfg.meta_split == "train" else val_mix

    def train_step(state, batch, step):  # the meta batch: an independent draw (seed + 1)
      meta_batch = mixture_batch(meta_mix, cfg, step, cfg.seed + 1)
      return trainer.step(state, batch, step_lib.shard_batch(meta_batch, mesh),
                          phase=trainer.phase(step))
  elif exp.method.level == "meta":
    meta_arrays = train_arrays if cfg.meta_split == "train" else val_arrays

    def train_step(state, batch, step):  # the meta batch: an independent draw (seed + 1)
      meta_batch = pipeline.train_batch(meta_arrays, step=step,
                                        **{**data_kw, "seed": cfg.seed + 1})
      return trainer.step(state, batch, step_lib.shard_batch(meta_batch, mesh),
                          phase=trainer.phase(step))
  else:
    def train_step(state, batch, step):
      return trainer.step(state, batch, phase=trainer.phase(step))
  affinity_every = relation_args["affinity_every"]
  names = tuple(exp.tasks)
  mngr = checkpoint.manager(ckpt_dir, cfg.keep_checkpoints)
  board = _tensorboard(cfg, workdir, names)
  show = _prediction_shower(cfg, exp, workdir, val_mix.datasets[0][0] if several else val_arrays,
                            board)
  mix_kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, sampler=cfg.get(
      "dataset_sampler", "proportional"), num_steps=cfg.num_steps,
      process_count=jax.process_count())

  def save():
    if several:   # every dataset's position
      position = mixing.position(mix.steps, int(state.step), mix.sizes(), **mix_kw)
    else:
      position = pipeline.position(int(state.step), pipeline.size(train_arrays), cfg.batch_size,
                                   cfg.seed, jax.process_count())
    checkpoint.save(mngr, state, {"config": config_lib.identity(cfg), "data_position": position,
                                  "seed": cfg.seed})

  first = int(state.step)
  if resume_step is not None:   # continue from the saved pipeline position
    saved_position = checkpoint.read_metadata(ckpt_dir, first).get("data_position", {})
    try:
      if several and saved_position:
        start = mixing.resume_step(saved_position, mix.steps, mix.sizes(), **mix_kw)
      elif several:
        start = first
      else:
        start = pipeline.resume_step(saved_position, pipeline.size(train_arrays),
                                     cfg.batch_size, cfg.seed, jax.process_count()
                                     ) if saved_position else first
    except ValueError as e:
      raise UserError(f"--workdir: {e}; use another --workdir") from None
    if start != first:
      raise RunError(f"checkpoint step {first} holds the input position of step {start}")
  last = cfg.num_steps if stop_after is None else min(cfg.num_steps, first + stop_after)
  bar = _progress(first, cfg.num_steps, progress)
  tick, tick_step = time.perf_counter(), first
  skipped = None
  try:
    with open(log_path if _primary() else os.devnull, "a") as log:
      if several:
        stream = pipeline.read_ahead(functools.partial(mixture_batch, mix, cfg, seed=cfg.seed),
                                     first, last, num_workers=cfg.dataset.get("num_workers", 0))
      else:
        stream = pipeline.batches(train_arrays, start=first, stop=last,
                                  num_workers=cfg.dataset.get("num_workers", 0),
                                  loader=cfg.dataset.get("loader", "threads"), **data_kw)
      for step, batch in stream:
        state, step_metrics = train_step(state, step_lib.shard_batch(batch, mesh), step)
        done = step + 1
        logs = cfg.log_every and (done % cfg.log_every == 0 or done == cfg.num_steps)
        evals = cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.num_steps
        saves = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == last
        affinity = affinity_every and done % affinity_every == 0
        if logs:
          record = log_record(step_metrics)
          if "conflict/cosine" in record:  # the pairs below config.relations.conflict_threshold
            record["conflict/fraction"] = float(relations.conflict_fraction(
                np.asarray(record["conflict/cosine"]),
                relations.conflict_threshold(cfg.get("relations", None))))
          if not affinity:
            record.pop("affinity", None)
          now = time.perf_counter()
          record.update(step=done, split="train", learning_rate=float(exp.schedule(step)),
                        steps_per_sec=(done - tick_step) / (now - tick))
          tick, tick_step = now, done
          log.write(json.dumps(record) + "\n")
          log.flush()
          if board:
            board.scalars(record, done)
          bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in record.items()
                           if k.startswith("loss/") and k.count("/") == 1})
          if record.get("skipped", 0) != (skipped or 0):
            skipped = record["skipped"]
            warn(f"step {done}: {int(skipped)} non-finite update(s) skipped so far "
                 "(config.nonfinite='skip')")
        elif affinity:  # TAG's affinity at a step that logs nothing else
          log.write(json.dumps({"step": done, "split": "affinity", "affinity": np.asarray(
              jax.device_get(step_metrics["affinity"])).tolist()}) + "\n")
        if logs or evals or saves:  # the loop syncs here anyway
          check_health(state, names, cfg, saved)
        if evals:
          results = evaluate_split(trainer.evaluate, state, val_arrays, exp.tasks,
                                   cfg.eval_batch_size, mesh)
          log.write(json.dumps({"step": done, "split": "validation",
                                **_flat(results, "validation")}) + "\n")
          log.flush()
          if board:
            board.scalars(_flat(results, "validation"), done)
          show(state, done)
        if saves:
          save()
          saved = done
        bar.update(1)
    check_health(state, names, cfg, saved)
  except BaseException:
    bar.close()
    with contextlib.suppress(Exception):  # after a failed save, close raises the same again
      mngr.close()
    raise
  bar.close()
  mngr.close()
  if int(state.step) < cfg.num_steps:
    if board:
      board.close()
    return {}
  try:
    return report(cfg, workdir, exp, trainer, state, mesh, val_arrays, board=board, show=show)
  finally:
    if board:
      board.close()


def _tensorboard(cfg, workdir, names):
  """A :class:`mtjax.train.figures.TensorBoard` writing into ``workdir`` if
  ``config.tensorboard``, else None."""
  if not cfg.get("tensorboard", False):
    return None
  try:
    return figures.TensorBoard(workdir, names)
  except ImportError as e:
    raise UserError(str(e)) from None


def first_examples(split, n: int) -> dict | None:
  """The first ``n`` examples of a split: arrays in memory, or a dataset read lazily (a
  :class:`mtjax.data.sources.Source`: only those ``n`` are read); None when ``n <= 0``."""
  if n <= 0:
    return None
  if isinstance(split, sources.Source):
    return sources.read_all(split, min(n, split.size))
  return {k: v[:n] for k, v in split.items()}


def _prediction_shower(cfg, exp, workdir, val_arrays, board=None):
  """``show(state, step)``: writes ``predictions/step_<step>.png`` (the first
  ``config.prediction_images`` validation examples, each task's target and prediction, a
  detection task's boxes with class and score; see
  :func:`mtjax.train.figures.prediction_grid`) and adds it to TensorBoard; a no-op at 0."""
  val_arrays = first_examples(val_arrays, cfg.get("prediction_images", 0))
  n = len(val_arrays["image"]) if val_arrays else 0
  if n <= 0:
    return lambda state, step: None
  model, tasks = exp.model, exp.tasks
  info = config_lib.task_options(cfg)
  size = tuple(cfg.dataset.image_size)
  targets = {}
  for name, task in tasks.items():
    if not np.any(val_arrays.get(f"{name}_mask", np.ones(n))[:n]):
      continue  # masked out of these examples (several datasets)
    keys = [k for k in task.label_spec(size) if k in val_arrays]
    if "boxes" in keys:   # detection: the boxes and their classes
      targets[name] = {k: val_arrays[k][:n] for k in keys}
    elif keys and keys[0] == next(iter(task.label_spec(size))):
      targets[name] = val_arrays[keys[0]][:n]
  labelled_by = {task: entry["name"] for entry in reversed(config_lib.dataset_entries(cfg).values())
                 for task in entry["tasks"]}
  class_names = {name: detection_plot.class_names_of(
      data.dataset_info(labelled_by[name])["class_names"], info[name].get("num_classes", 0))
      for name in tasks if isinstance(targets.get(name), dict)}
  images = val_arrays["image"][:n]

  @jax.jit
  def predict(params, batch_stats):
    outputs = model.apply({"params": params, "batch_stats": batch_stats}, images, False)
    return {name: task.predict_fn(outputs[name]) for name, task in tasks.items()}

  def show(state, step):
    predictions = jax.device_get(predict(state.params, state.batch_stats))
    folder = os.path.join(workdir, "predictions")
    os.makedirs(folder, exist_ok=True)
    grid = figures.prediction_grid(
        os.path.join(folder, f"step_{step}.png"), images, targets, predictions,
        {name: info[name].get("num_classes", 0) or 0 for name in tasks},
        title=f"validation examples, step {step}", class_names=class_names)
    if board:
      board.image("predictions", grid, step)
  return show


def report(cfg, workdir, exp, trainer, state, mesh, val_arrays=None, board=None,
           show=None) -> dict:
  """Evaluates on validation and test; writes results.json, results.md, curves.png, the
  relation heatmaps (relations.png, when the log has matrices) and the last prediction grid."""
  if config_lib.several_datasets(cfg):
    if val_arrays is None:
      val_arrays = load_mixture(cfg, "validation", exp).labelled()
    test_arrays = load_mixture(cfg, "test", exp).labelled()
  else:
    if val_arrays is None:
      val_arrays = load_data(cfg, "validation", exp.label_keys)
    test_arrays = load_data(cfg, "test", exp.label_keys)
  baselines = {t: dict(m) for t, m in cfg.baselines.items()}
  out, tables = {"step": int(state.step), "baselines": baselines,
                 "runtime": runtime.describe()}, []
  for split, arrays in (("validation", val_arrays), ("test", test_arrays)):
    results = evaluate_split(trainer.evaluate, state, arrays, exp.tasks, cfg.eval_batch_size, mesh)
    delta = metrics.delta_m(exp.tasks, results, baselines)
    out[split] = {"metrics": results, "delta_m": delta}
    tables.append(metrics.format_table(results, None if np.isnan(delta) else delta,
                                       f"{split}, step {int(state.step)}, "
                                       f"method {cfg.weighting.name}"))
  out.update(_relations_summary(os.path.join(workdir, "metrics.jsonl"), tuple(exp.tasks),
                                trainer.conflict_level))
  text = "\n\n".join(tables)
  if not _primary():  # several hosts: process 0 writes the files
    return out
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  log_path = os.path.join(workdir, "metrics.jsonl")
  plot_curves(log_path, os.path.join(workdir, "curves.png"),
              {"step": int(state.step), **_flat(out["validation"]["metrics"], "validation")},
              conflict_threshold=relations.conflict_threshold(cfg.get("relations", None)))
  figures.relation_heatmaps(
      log_path, os.path.join(workdir, "relations.png"), tuple(exp.tasks),
      titles={"conflict/cosine": f"conflict/cosine ({trainer.conflict_level} level)"}
      if trainer.conflict_level else None)
  (show or _prediction_shower(cfg, exp, workdir, val_arrays[0] if isinstance(
      val_arrays, list) else val_arrays, board))(state, int(state.step))
  if board:
    board.scalars(_flat(out["validation"]["metrics"], "final/validation"), int(state.step))
  return out


def _relations_summary(log_path: str, names, conflict_level: str | None = None) -> dict:
  """``{"relations": {...}}``: TAG's affinity and the gradient cosine averaged over the run's
  log, with the gradient level of the cosine (empty when neither was logged)."""
  if not os.path.exists(log_path):
    return {}
  with open(log_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  out = {"tasks": list(names)}
  for key, name in (("affinity", "affinity"), ("conflict/cosine", "conflict_cosine")):
    mean, count = relations.mean_matrix(records, key)
    if count:
      out[name] = mean.tolist()
      out[f"{name}_count"] = count
  fractions = [r["conflict/fraction"] for r in records if "conflict/fraction" in r]
  if fractions:
    out["conflict_fraction"] = float(np.mean(fractions))
    if conflict_level:
      out["conflict_level"] = conflict_level
  return {"relations": out} if len(out) > 1 else {}


def evaluate(cfg, workdir: str) -> dict:
  """Restores the newest checkpoint of ``workdir`` and writes the results (``mtjax eval``);
  without a checkpoint there, the weights of ``config.model.pretrained`` (e.g. a model trained
  by LibMTL)."""
  mesh = make_mesh(cfg)
  config_lib.validate(cfg, mesh.size)
  exp = build(cfg)
  trainer = make_trainer(cfg, exp, mesh)
  step = check_workdir(cfg, workdir)
  if step is None and not cfg.model.get("pretrained", ""):
    raise UserError(f"--workdir: {workdir!r} has no checkpoint to evaluate (nor is "
                    "config.model.pretrained set)")
  state = initial_state(cfg, trainer, workdir, step, exp.model)
  os.makedirs(workdir, exist_ok=True)
  open(os.path.join(workdir, "metrics.jsonl"), "a").close()  # imported weights: an empty log
  return report(cfg, workdir, exp, trainer, state, mesh)


def _progress(initial, total, enabled):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
              desc="train")
