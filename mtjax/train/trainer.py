"""One factory for the train state and the steps, in the optax style: ``init`` and ``step``.

    trainer = make_trainer(model, tasks, method, optimizer, image_shape=(64, 64, 3),
                           batch_size=32, grad_level="parameter")
    state = trainer.init(jax.random.PRNGKey(0))
    state, metrics = trainer.step(state, batch)            # meta methods: (state, batch, meta)
    task_metrics, predictions = trainer.evaluate(state, batch)

The gradient level, the shape of what ``method.init`` receives, the frozen parameter groups and
the step are decided here, together. The steps are one ``jax.jit`` over a ``("data", "fsdp")``
``Mesh`` (:func:`mtjax.train.step.make_mesh`): the batch split over every device (data x fsdp), the
parameter-shaped leaves of the state split on ``"fsdp"`` and the rest replicated
(:func:`mtjax.train.step.state_shardings`; with ``fsdp == 1``, the default, all replicated:
pure data parallelism), the state donated. ``init`` returns the state laid out that way.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mtjax import relations
from mtjax.models import labels
from mtjax.train import meta as meta_lib
from mtjax.train import strategies as strategies_lib
from mtjax.train.periods import due
from mtjax.train.state import TrainState, healthy
from mtjax.train.step import (
  MODEL_KEY_TAG,
  apply_gradients,
  balance,
  batch_sharding,
  check_double_sampling,
  check_grad_level,
  check_nonfinite_policy,
  check_task_chunk,
  conflict_level_of,
  cross_gram,
  final_output,
  make_mesh,
  place,
  state_shardings,
  task_terms,
)


class Trainer(NamedTuple):
  """``init(key) -> TrainState``; jitted ``step`` and ``evaluate`` (see the module docstring)."""

  init: Callable
  step: Callable       # (state, batch, meta_batch=None, *, phase=None) -> (state, metrics)
  evaluate: Callable
  grad_level: str
  # Where the state lives: one replicated NamedSharding (fsdp == 1), else a TrainState of them.
  shardings: object = None
  # 0-based step -> the strategy's Phase of that step (mtjax.train.strategies); the loop
  # passes it to ``step``, which compiles once per distinct phase.
  phase: Callable = lambda step: strategies_lib.END_TO_END
  # The gradient level of the logged conflict/* metrics ("parameter" or "representation");
  # None when the step does not measure them (conflict_every=0).
  conflict_level: str | None = None
  # (state, images) -> {task: predict_fn of its output}: what the prediction figures draw.
  predict: Callable | None = None


def gradient_like(model, params, batch_stats, *, grad_level, image_shape, batch_size):
  """Zeros shaped like one task's gradient at ``grad_level``: what ``method.init`` receives.

  The shared parameters at the parameter level, the shared features (any pytree) of a global
  batch at the representation level. Made on the host, so no computation is compiled.
  """
  if grad_level == "representation":
    like = jax.eval_shape(
        lambda p, s: model.apply({"params": p, "batch_stats": s},
                                 jnp.zeros((batch_size, *image_shape)), method="encode"),
        params, batch_stats)
  else:
    like = labels.split(model, params).get(labels.SHARED, {})
  return jax.tree_util.tree_map(lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)), like)


class StepOptions(NamedTuple):
  """How the step trains (see :func:`make_trainer`): the typed values a run plan
  (:class:`mtjax.train.setup.Run`) resolves from a config, or a library user sets."""

  image_shape: tuple = (64, 64, 3)     # (H, W, C) of one example
  batch_size: int = 32                 # the global batch
  grad_level: str = "parameter"        # where gradient methods act
  frozen: tuple = ()                   # label prefixes not differentiated
  lookahead_lr: object = None          # a meta method's virtual step: float or schedule
  nonfinite: str = "stop"              # or "skip"
  max_consecutive_skips: int = 10
  task_chunk: int = 0                  # > 0: the Gram matrix this many tasks at a time
  conflict_every: int = 0              # conflict/* at the steps n % every == 0 or last_step
  last_step: int = 0
  conflict_level: str = "auto"
  affinity_every: int = 0              # TAG's affinity at the steps n % every == 0
  affinity_lr: object = None           # its lookahead rate (default lookahead_lr)
  phase_at: Callable | None = None     # the strategy: step -> Phase; None: end to end


def check_options(model, method, options: StepOptions, mesh) -> None:
  """Raises ValueError naming the option (``grad_level: ...``) when the step cannot run with
  ``options`` on ``mesh``: before anything is traced."""
  check_grad_level(model, options.grad_level)
  check_task_chunk(model, method, options.grad_level, options.task_chunk)
  check_nonfinite_policy(options.nonfinite, options.max_consecutive_skips)
  own_lr = method.meta is not None and method.meta.lookahead_lr is not None
  if method.level == "meta" and options.lookahead_lr is None and not own_lr:
    raise ValueError("lookahead_lr: a meta-level method needs the learning rate of its "
                     "lookahead step (a float or the optimizer's schedule)")
  check_double_sampling(method, options.batch_size, mesh.devices.size, options.task_chunk)
  meta_lib.check_batch(method, options.batch_size, mesh.devices.size)
  if options.affinity_every and (options.affinity_lr if options.affinity_lr is not None
                                 else options.lookahead_lr) is None:
    raise ValueError("affinity_lr: the affinity lookahead needs a learning rate (a float or "
                     "the optimizer's schedule)")
  conflict_level_of(model, method, options.grad_level, options.conflict_level)


def make_trainer(model, tasks: Mapping, method, optimizer, options: StepOptions | None = None, *,
                 mesh=None, donate: bool = True, **fields) -> Trainer:
  """The state factory and the jitted steps of one experiment.

  ``tasks`` maps names to :class:`mtjax.tasks.Task`; ``method`` is a weighting method;
  ``optimizer`` an optax transformation (freeze groups in it too, see
  :func:`mtjax.train.optim.make_optimizer`); ``options``: :class:`StepOptions`, whose
  ``fields`` may also be given (or overridden) as keywords. ``image_shape`` (H, W, C) and
  ``batch_size`` (the global batch) shape the state; ``frozen``: label prefixes whose
  parameters the step does not differentiate; ``lookahead_lr``: the virtual step's learning
  rate of a meta-level method, a float or a schedule of the step (pass the optimizer's
  schedule); not needed when the method's ``meta.lookahead_lr`` is set (MOML, FORUM: their
  own inner rate). ``nonfinite``: ``"stop"`` (record in ``state.health`` the first step whose
  losses, gradient or parameters are not finite) or ``"skip"`` (skip such updates; stop at
  ``max_consecutive_skips`` in a row), see :func:`mtjax.train.step.apply_gradients`.
  ``task_chunk > 0``: at the parameter level, with a method that has ``from_gram``, the Gram
  matrix of the task gradients is computed that many tasks at a time (bounded memory for many
  tasks, one more backward pass; see :func:`mtjax.train.step.balance`); 0 (default): all
  tasks at once. ``mesh``: from :func:`mtjax.train.mesh.make_mesh` (default: every device on
  ``"data"``); with an ``"fsdp"`` axis of size > 1 the state's parameter-shaped leaves are
  split on it (the module docstring). A method with ``double_sampling`` (MoDo) also gets the
  per-task gradients of the two halves of each batch (:func:`mtjax.train.step.cross_gram`):
  ``batch_size`` must then be even on every device.

  Relations (:mod:`mtjax.relations`), computed on device behind a ``lax.cond`` only at the
  steps that report them (the step stays one compiled program): ``conflict_every > 0``: the
  gradient-conflict metrics ``conflict/*`` at the steps ``n`` (counted from 1) with ``n %
  conflict_every == 0`` or ``n == last_step`` (the loop's logging steps,
  :func:`mtjax.train.setup.due`), at the level :func:`mtjax.train.step.conflict_level_of`
  picks from ``conflict_level`` (``"auto"``: a gradient-level method's own level; a loss- or
  meta-level method's: the shared representation of an encoder model, else the shared
  parameters; ``Trainer.conflict_level`` says which); ``affinity_every > 0``: TAG's
  ``affinity`` (T, T) at the steps ``n % affinity_every == 0``, with the lookahead rate
  ``affinity_lr`` (a float or schedule; default ``lookahead_lr``). ``phase_at``: the
  strategy, step -> :class:`mtjax.train.strategies.Phase` (the optimizer must then be
  :func:`mtjax.train.optim.make_grouped_optimizer`); None: end to end.
  """
  options = (options or StepOptions())._replace(**fields)
  mesh = make_mesh() if mesh is None else mesh
  check_options(model, method, options, mesh)
  (image_shape, batch_size, grad_level, frozen, lookahead_lr, nonfinite, max_consecutive_skips,
   task_chunk, conflict_every, last_step, conflict_level, affinity_every, affinity_lr,
   phase_at) = options
  double_sampling = bool(getattr(method, "double_sampling", False))
  split = meta_lib.trains_on_meta(method)
  names = tuple(tasks)
  frozen = tuple(frozen)
  level = conflict_level_of(model, method, grad_level, conflict_level)
  # None: the task gradients a gradient-level method already has (or its chunked Gram matrix).
  measure_at = None if method.level == "gradient" and level == grad_level else level

  def init_host(key) -> TrainState:
    init_key, root_key = jax.random.split(key)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(init_key, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        weighting_state=method.init(len(names), gradient_like(
            model, params, batch_stats, grad_level=grad_level, image_shape=image_shape,
            batch_size=batch_size)),
        key=root_key,
        health=healthy(len(names)),
    )
    # One buffer per leaf: a method's init may reuse an array (``zeros, zeros``), and the train
    # step donates the state, which fails on a buffer passed twice.
    return jax.tree_util.tree_map(jnp.copy, state)

  shapes = jax.eval_shape(init_host, jax.random.PRNGKey(0)) if mesh.shape.get("fsdp", 1) > 1 \
      else None
  shardings = state_shardings(shapes, mesh) if shapes is not None else NamedSharding(
      mesh, PartitionSpec())

  def init(key) -> TrainState:
    """The fresh state of ``key``, laid out on the mesh (see the module docstring)."""
    state = init_host(key)
    return place(state, shardings if shapes is not None else state_shardings(state, mesh))

  if affinity_every and affinity_lr is None:
    affinity_lr = lookahead_lr

  def make_step(phase):
    step_frozen = frozen + tuple(p for p in phase.frozen if p not in frozen)
    mask = None if phase.active is None else jnp.asarray(phase.active, jnp.float32)

    def forward(state, batch, key):
      terms = task_terms(model, tasks, state.params, state.batch_stats, batch,
                         grad_level=grad_level, frozen=step_frozen,
                         key=jax.random.fold_in(key, MODEL_KEY_TAG))
      if mask is not None:  # a task outside the phase contributes no loss
        terms = terms._replace(combine=lambda w, c=terms.combine: c(w * mask))
      return terms

    def step(state: TrainState, batches):
      batch, meta_batch = meta_lib.split_batch(batches[0]) if split else batches
      key = jax.random.fold_in(state.key, state.step)
      done = state.step + 1
      logs = due(done, conflict_every, last_step) if conflict_every else None
      seen = {}
      terms = forward(state, batch, key)
      if method.level == "meta":  # the meta information and the update: train/meta.py
        alpha = lookahead_lr(state.step) if callable(lookahead_lr) else lookahead_lr
        grads, wstate, weights, meta_metrics = meta_lib.meta_step(
            model, tasks, method, state, terms, batch, meta_batch, alpha, key, step_frozen)
        if logs is not None:
          seen = relations.when(
              logs, lambda: relations.conflict_from_grads(terms.per_task(level)[0]))
      else:
        cross = (cross_gram(model, tasks, state.params, state.batch_stats, batch,
                            grad_level=grad_level, frozen=step_frozen)
                 if double_sampling else None)
        grads, wstate, weights, seen = balance(
            terms, method, state.weighting_state, key, task_chunk, cross, conflict=logs,
            conflict_level=measure_at)
      if mask is not None:
        weights = weights * mask
      new_state, metrics = apply_gradients(
          state, optimizer, names, grads, wstate, terms, weights, nonfinite=nonfinite,
          max_consecutive_skips=max_consecutive_skips,
          frozen=None if phase_at is None else phase.frozen)
      if method.level == "meta":
        metrics.update(meta_metrics)
      metrics.update(seen)
      if affinity_every:
        metrics["affinity"] = relations.when(
            due(done, affinity_every), lambda: affinity(state, batch))
      return new_state, metrics

    return step

  def affinity(state, batch):
    def shared_of(params):
      own = labels.split(model, params)
      shared = own.pop(labels.SHARED, {})
      return shared, own, lambda s, rest: labels.merge(s, *rest.values())
    lr = affinity_lr(state.step) if callable(affinity_lr) else affinity_lr
    loss_of_shared = relations.task_loss_fn(model, tasks, state.params, state.batch_stats,
                                            batch, shared_of)
    return relations.lookahead_affinity(loss_of_shared, shared_of(state.params)[0], lr)

  def evaluate(state: TrainState, batch):
    terms = task_terms(model, tasks, state.params, state.batch_stats, batch, train=False)
    metrics = {name: task.metrics_fn(terms.outputs[name], batch) for name, task in tasks.items()}
    predictions = {name: task.predict_fn(terms.outputs[name])
                   for name, task in tasks.items() if task.evaluator is not None}
    return metrics, predictions

  def predict(state: TrainState, images):
    """Each task's ``predict_fn`` of the evaluation's outputs (a DeepSupervision's final)."""
    outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                          False)
    return {name: task.predict_fn(final_output(outputs[name])) for name, task in tasks.items()}

  replicated = NamedSharding(mesh, PartitionSpec())
  data = batch_sharding(mesh)
  jitted_steps = {}  # one compiled step per distinct phase

  def jitted_step(phase):
    if phase not in jitted_steps:
      jitted_steps[phase] = jax.jit(make_step(phase), in_shardings=(shardings, data),
                                    out_shardings=(shardings, replicated),
                                    donate_argnums=(0,) if donate else ())
    return jitted_steps[phase]
  jitted_eval = jax.jit(evaluate, in_shardings=(shardings, data), out_shardings=replicated)
  jitted_predict = jax.jit(predict, in_shardings=(shardings, replicated),
                           out_shardings=replicated)
  phase_of = phase_at or (lambda step: strategies_lib.END_TO_END)

  def train_step(state, batch, meta_batch=None, *, phase=None):
    if meta_lib.draws_meta_batch(method) and meta_batch is None:
      raise ValueError("meta_batch: a meta-level method's step needs a meta batch")
    if phase is None and phase_at is not None:
      raise ValueError("phase: a trainer with a strategy needs the step's phase "
                       "(trainer.phase(step))")
    return jitted_step(phase or strategies_lib.END_TO_END)(state, (batch, meta_batch))

  return Trainer(init, train_step, jitted_eval, grad_level, shardings, phase_of,
                 level if conflict_every else None, jitted_predict)
