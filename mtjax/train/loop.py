"""The training loop: build, restore, train, evaluate, report, reading a resolved run plan.

``train(run, workdir)`` is what ``mtjax train`` runs (``run``: a :class:`mtjax.train.setup.Run`,
or a config, resolved first). The workdir holds ``config.json``, ``checkpoints/`` (orbax),
``metrics.jsonl`` (one JSON object a logging or evaluation step), ``predictions/step_<N>.png``
at each evaluation (:mod:`mtjax.train.figures`), TensorBoard event files if
``config.tensorboard``, and at the end ``results.json``, ``results.md``, ``curves.png`` and
``relations.png``; the writers are :mod:`mtjax.train.sinks`.
"""

import contextlib
import json
import os
import time

import jax
import numpy as np

from mtjax import checkpoint, metrics, relations, runtime
from mtjax.data import pipeline
from mtjax.errors import RunError, UserError
from mtjax.models import pretrained
from mtjax.train import figures, setup, sinks
from mtjax.train import inputs as inputs_lib
from mtjax.train import mesh as mesh_lib
from mtjax.train import meta as meta_lib

warn = sinks.warn


def _plan(run) -> setup.Run:
  return run if isinstance(run, setup.Run) else setup.resolve(run)


def train(run, workdir: str, *, progress: bool = True, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run in ``workdir``; returns the final results.

  ``stop_after`` ends the run after that many steps of this call (to test resuming).
  """
  # 1. Build: the plan, the compiled functions, the data (nothing read from the config).
  run = _plan(run)
  exp, periods, data = run.experiment, run.periods, run.inputs
  trainer = setup.make_trainer(None, exp, run.mesh, run.step_options)
  resume_step = check_workdir(run, workdir)
  _warn_if_masked_steps_vanish(run)
  mix = inputs_lib.load_mixture(data, "train", exp.tasks, periods.num_steps)
  val_mix = inputs_lib.load_mixture(data, "validation", exp.tasks, periods.num_steps)
  inputs_lib.check_mixture(mix, data, exp.tasks)
  write_config(run, workdir)
  # 2. Restore: the newest checkpoint, and where its input pipeline stood.
  state = initial_state(run, trainer, workdir, resume_step)
  first = int(state.step)
  start = _resume_position(run, workdir, mix, first) if resume_step is not None else first
  if start != first:
    raise RunError(f"checkpoint step {first} holds the input position of step {start}")
  last = periods.num_steps if stop_after is None else min(periods.num_steps, first + stop_after)
  out = sinks.open_sinks(workdir, exp.tasks, resumed=None if resume_step is None else first,
                         first=first, total=periods.num_steps, progress=progress,
                         tensorboard=run.tensorboard)
  show = prediction_shower(run, trainer, val_mix.datasets[0][0], out)
  meta_mix = mix if data.meta_split == "train" else val_mix
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), run.keep_checkpoints)
  saved = first if resume_step is not None else None
  tick = (time.perf_counter(), first)
  names, health = tuple(exp.tasks), {"nonfinite": run.nonfinite,
                                     "max_consecutive_skips": run.max_consecutive_skips}
  # 3. Train: one step a batch; log, evaluate and save on the periods' steps.
  try:
    for step, batch in inputs_lib.stream(mix, data, first, last, periods.num_steps):
      meta = None if not meta_lib.draws_meta_batch(exp.method) else mesh_lib.shard_batch(
          inputs_lib.batch_of(
              meta_mix, step, batch_size=data.batch_size, seed=data.seed + 1,
              num_steps=periods.num_steps), run.mesh)   # an independent draw (seed + 1)
      state, step_metrics = trainer.step(state, mesh_lib.shard_batch(batch, run.mesh), meta,
                                         phase=trainer.phase(step))
      done = step + 1
      if periods.logs(done):
        record = log_record(step_metrics)
        if "conflict/cosine" in record:  # the pairs below config.relations.conflict_threshold
          record["conflict/fraction"] = float(relations.conflict_fraction(
              np.asarray(record["conflict/cosine"]), run.conflict_threshold))
        if not periods.affinity_at(done):
          record.pop("affinity", None)
        now = time.perf_counter()
        record.update(step=done, split="train", learning_rate=float(exp.schedule(step)),
                      steps_per_sec=(done - tick[1]) / (now - tick[0]))
        tick = (now, done)
        out.write(record)
      elif periods.affinity_at(done):  # TAG's affinity at a step that logs nothing else
        out.write({"step": done, "split": "affinity", "affinity": np.asarray(
            jax.device_get(step_metrics["affinity"])).tolist()})
      evaluates, saves = periods.evaluates(done), periods.saves(done, last)
      if periods.logs(done) or evaluates or saves:  # the loop syncs here anyway
        raise_if_unhealthy(state, names, saved, **health)
      if evaluates:
        results = evaluate_split(trainer.evaluate, state, val_mix.labelled(), exp.tasks,
                                 data.eval_batch_size, run.mesh)
        out.write({"step": done, "split": "validation", **sinks.flat(results, "validation")})
        show(state, done)
      if saves:
        checkpoint.save(mngr, state, {"config": run.identity, "seed": run.seed,
                                      "data_position": inputs_lib.position(
                                          mix, done, data, periods.num_steps)})
        saved = done
      out.bar.advance()
    raise_if_unhealthy(state, names, saved, **health)
  except BaseException:
    out.close()
    with contextlib.suppress(Exception):  # after a failed save, close raises the same again
      mngr.close()
    raise
  mngr.close()
  # 4. Report: validation and test, the results table and the figures.
  try:
    if int(state.step) < periods.num_steps:
      return {}
    return report(run, workdir, trainer, state, val_mix.labelled(), out, show)
  finally:
    out.close()


def _warn_if_masked_steps_vanish(run: setup.Run) -> None:
  if len(run.inputs.entries) > 1 and run.method_name in setup.MASKED_STEP_VANISHES:
    warn(f"config.weighting.name: {run.method_name!r} puts (almost) all its weight on a task "
         "masked out of a step (loss 0, zero gradient), so the shared parameters barely move "
         "on the steps whose dataset does not label every task "
         "(benchmarks/results/masked_task.md)")


def write_config(run: setup.Run, workdir: str) -> None:
  """``workdir/config.json`` (process 0); the workdir made if missing."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if sinks.primary():
      with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(run.config, f, indent=2, default=list)
  except OSError as e:
    raise UserError(f"--workdir: cannot write to {workdir!r}: {e.strerror or e}") from e


def _resume_position(run, workdir, mix, first: int) -> int:
  """The step the saved input position of checkpoint ``first`` continues from."""
  saved = checkpoint.read_metadata(os.path.join(workdir, "checkpoints"), first).get(
      "data_position", {})
  try:
    return inputs_lib.resume_step(saved, mix, run.inputs, run.periods.num_steps, first)
  except ValueError as e:
    raise UserError(f"--workdir: {e}; use another --workdir") from None


def check_workdir(run: setup.Run, workdir: str) -> int | None:
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
    now = run.identity
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
      details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in diff[:8])
      raise UserError(
          f"workdir {workdir!r} holds a checkpoint (step {step}) of a different config "
          f"({details}). Use another --workdir, or the config that wrote it; the checkpoint was "
          "left untouched.")
    return step
  return None


def initial_state(run: setup.Run, trainer, workdir: str, step: int | None):
  """A fresh state seeded by the run's seed (its backbone from ``config.model.pretrained`` if
  set), or the newest readable checkpoint if ``step`` is set.

  A newer checkpoint that cannot be read is reported and moved aside
  (:func:`mtjax.checkpoint.restore_newest`).
  """
  state = trainer.init(jax.random.PRNGKey(run.seed))
  if step is None and run.pretrained:
    with setup.building():
      params, stats = pretrained.load(run.experiment.model, state.params, state.batch_stats,
                                      run.pretrained, run.architecture)
    state = state._replace(params=params, batch_stats=stats)
  if step is not None:
    state, _, _ = checkpoint.restore_newest(os.path.join(workdir, "checkpoints"), state,
                                            warn=warn)
  return state


def raise_if_unhealthy(state, names, saved: int | None, *, nonfinite: str = "stop",
                       max_consecutive_skips: int | None = None) -> None:
  """Raises :class:`RunError` if the run must stop at a non-finite step (``state.health``).

  Reads a few scalars: call it only where the loop syncs anyway (logging, evaluation,
  checkpoint, report). ``saved``: the step of the newest checkpoint on disk; ``nonfinite``
  and ``max_consecutive_skips``: the run's policy (:class:`mtjax.train.trainer.StepOptions`).
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
  if nonfinite == "skip":
    raise RunError(
        f"step {bad_step}: {max_consecutive_skips} updates in a row were skipped "
        f"(config.max_consecutive_skips), the last because {what} not finite; "
        f"{int(health.skipped)} skipped in all; {on_disk}. "
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
  (:meth:`mtjax.train.inputs.Mixture.labelled`): each task is then measured on the examples
  that label it.
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


def _device_batch(batch, mesh):
  """A global host batch on ``mesh``; on several hosts each process sends only its rows."""
  return mesh_lib.shard_batch(
      pipeline.process_slice(batch, jax.process_index(), jax.process_count()), mesh)


def prediction_shower(run: setup.Run, trainer, val_split, out: sinks.Sinks | None = None):
  """``show(state, step)``: writes ``predictions/step_<step>.png`` (the first
  ``config.prediction_images`` validation examples, each task's target and prediction, a
  task with a ``draw`` drawing its own (a detection task's boxes with class and score); see
  :func:`mtjax.train.figures.prediction_grid`) and hands it to TensorBoard; a no-op at 0 or on
  a process that writes no files. The predictions are the evaluation's outputs
  (``trainer.predict``)."""
  examples = inputs_lib.first_examples(val_split, run.prediction_images)
  n = len(examples["image"]) if examples else 0
  if n <= 0 or (out is not None and out.workdir is None):
    return lambda state, step: None
  tasks, size = run.experiment.tasks, tuple(run.inputs.image_size)
  num_classes = run.inputs.num_classes
  targets, draw = {}, {}
  for name, task in tasks.items():
    if not np.any(examples.get(f"{name}_mask", np.ones(n))[:n]):
      continue  # masked out of these examples (several datasets)
    keys = [k for k in task.label_spec(size) if k in examples]
    if task.draw is not None:   # drawn by the task: all its labels
      targets[name], draw[name] = {k: examples[k][:n] for k in keys}, task.draw
    elif keys and keys[0] == next(iter(task.label_spec(size))):
      targets[name] = examples[keys[0]][:n]
  images = examples["image"][:n]
  workdir = None if out is None else out.workdir

  def show(state, step):
    predictions = jax.device_get(trainer.predict(state, images))
    folder = os.path.join(workdir, "predictions")
    os.makedirs(folder, exist_ok=True)
    grid = figures.prediction_grid(
        os.path.join(folder, f"step_{step}.png"), images, targets, predictions, num_classes,
        title=f"validation examples, step {step}", class_names=run.inputs.class_names,
        draw=draw)
    if out is not None:
      out.image("predictions", grid, step)
  return show


def report(run: setup.Run, workdir, trainer, state, val_split=None, out=None,
           show=None) -> dict:
  """Evaluates on validation and test; writes results.json, results.md, curves.png, the
  relation heatmaps (relations.png, when the log has matrices) and the last prediction grid."""
  exp, data = run.experiment, run.inputs
  if val_split is None:
    val_mix = inputs_lib.load_mixture(data, "validation", exp.tasks, run.periods.num_steps)
    val_split = val_mix.labelled()
  test = inputs_lib.load_mixture(data, "test", exp.tasks, run.periods.num_steps).labelled()
  result, tables = {"step": int(state.step), "baselines": run.baselines,
                    "runtime": runtime.describe()}, []
  for split, arrays in (("validation", val_split), ("test", test)):
    results = evaluate_split(trainer.evaluate, state, arrays, exp.tasks, data.eval_batch_size,
                             run.mesh)
    delta = metrics.delta_m(exp.tasks, results, run.baselines)
    result[split] = {"metrics": results, "delta_m": delta}
    tables.append(sinks.results_table(results, delta, f"{split}, step {int(state.step)}, "
                                      f"method {run.method_name}"))
  result.update(_relations_summary(os.path.join(workdir, "metrics.jsonl"), tuple(exp.tasks),
                                   trainer.conflict_level))
  if not sinks.primary():  # several hosts: process 0 writes the files
    return result
  sinks.write_results(workdir, result, tables, trainer.conflict_level, tuple(exp.tasks),
                      run.conflict_threshold)
  if show is None:
    first_split = val_split[0] if isinstance(val_split, list) else val_split
    show = prediction_shower(run, trainer, first_split, out or sinks.Sinks((), None, None,
                                                                          workdir))
  show(state, int(state.step))
  if out is not None and out.board is not None:
    out.board.final(result, int(state.step))
  return result


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


def evaluate(run, workdir: str) -> dict:
  """Restores the newest checkpoint of ``workdir`` and writes the results (``mtjax eval``);
  without a checkpoint there, the weights of ``config.model.pretrained`` (e.g. a model trained
  by LibMTL)."""
  run = _plan(run)
  trainer = setup.make_trainer(None, run.experiment, run.mesh, run.step_options)
  step = check_workdir(run, workdir)
  if step is None and not run.pretrained:
    raise UserError(f"--workdir: {workdir!r} has no checkpoint to evaluate (nor is "
                    "config.model.pretrained set)")
  state = initial_state(run, trainer, workdir, step)
  os.makedirs(workdir, exist_ok=True)
  open(os.path.join(workdir, "metrics.jsonl"), "a").close()  # imported weights: an empty log
  return report(run, workdir, trainer, state)


def log_record(step_metrics) -> dict:
  """A step's metrics as JSON values: scalars as floats, arrays (``conflict/cosine``,
  ``affinity``, ``relations/<name>``) as nested lists."""
  return {k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()
          for k, v in jax.device_get(step_metrics).items()}
