"""One factory for the train state and the steps, in the optax style: ``init`` and ``step``.

    trainer = make_trainer(model, tasks, method, optimizer, image_shape=(64, 64, 3),
                           batch_size=32, grad_level="parameter")
    state = trainer.init(jax.random.PRNGKey(0))
    state, metrics = trainer.step(state, batch)            # meta methods: (state, batch, meta)
    task_metrics, predictions = trainer.evaluate(state, batch)

The gradient level, the shape of what ``method.init`` receives, the frozen parameter groups and
the step are decided here, together. The steps are one ``jax.jit`` over a ``Mesh``: the batch
sharded on ``"data"``, everything else replicated, the state donated.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mtjax.models import labels
from mtjax.train import meta as meta_lib
from mtjax.train.state import TrainState, healthy
from mtjax.train.step import (
    MODEL_KEY_TAG,
    apply_gradients,
    balance,
    check_grad_level,
    check_nonfinite_policy,
    check_task_chunk,
    make_mesh,
    task_terms,
)


class Trainer(NamedTuple):
  """``init(key) -> TrainState``; jitted ``step`` and ``evaluate`` (see the module docstring)."""

  init: Callable
  step: Callable
  evaluate: Callable
  grad_level: str


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


def make_trainer(model, tasks: Mapping, method, optimizer, *, image_shape, batch_size: int,
                 grad_level: str = "parameter", frozen=(), lookahead_lr=None, mesh=None,
                 donate: bool = True, nonfinite: str = "stop",
                 max_consecutive_skips: int = 10, task_chunk: int = 0) -> Trainer:
  """The state factory and the jitted steps of one experiment.

  ``tasks`` maps names to :class:`mtjax.tasks.Task`; ``method`` is a weighting method;
  ``optimizer`` an optax transformation (freeze groups in it too, see
  :func:`mtjax.train.optim.make_optimizer`); ``image_shape`` (H, W, C) and ``batch_size`` (the
  global batch) shape the state; ``frozen``: label prefixes whose parameters the step does not
  differentiate; ``lookahead_lr``: the virtual step's learning rate of a meta-level method, a
  float or a schedule of the step (pass the optimizer's schedule); not needed when the method's
  ``meta.lookahead_lr`` is set (MOML, FORUM: their own inner rate). ``nonfinite``: ``"stop"``
  (record in ``state.health`` the first step whose losses, gradient or parameters are not
  finite) or ``"skip"`` (skip such updates; stop at ``max_consecutive_skips`` in a row), see
  :func:`mtjax.train.step.apply_gradients`. ``task_chunk > 0``: at the parameter level, with a
  method that has ``from_gram``, the Gram matrix of the task gradients is computed that many
  tasks at a time (bounded memory for many tasks, one more backward pass; see
  :func:`mtjax.train.step.balance`); 0 (default): all tasks at once.
  """
  check_grad_level(model, grad_level)
  check_task_chunk(model, method, grad_level, task_chunk)
  check_nonfinite_policy(nonfinite, max_consecutive_skips)
  own_lr = method.meta is not None and method.meta.lookahead_lr is not None
  if method.level == "meta" and lookahead_lr is None and not own_lr:
    raise ValueError("lookahead_lr: a meta-level method needs the learning rate of its "
                     "lookahead step (a float or the optimizer's schedule)")
  mesh = make_mesh() if mesh is None else mesh
  names = tuple(tasks)
  frozen = tuple(frozen)

  def init(key) -> TrainState:
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

  def forward(state, batch, key):
    return task_terms(model, tasks, state.params, state.batch_stats, batch,
                      grad_level=grad_level, frozen=frozen,
                      key=jax.random.fold_in(key, MODEL_KEY_TAG))

  def step(state: TrainState, batches):
    batch, meta_batch = batches
    key = jax.random.fold_in(state.key, state.step)
    if method.level == "meta":  # the meta information and the update: train/meta.py
      alpha = lookahead_lr(state.step) if callable(lookahead_lr) else lookahead_lr
      terms = forward(state, batch, key)
      grads, wstate, weights, meta_metrics = meta_lib.meta_step(
          model, tasks, method, state, terms, batch, meta_batch, alpha, key, frozen)
    else:
      terms = forward(state, batch, key)
      grads, wstate, weights = balance(terms, method, state.weighting_state, key, task_chunk)
    new_state, metrics = apply_gradients(state, optimizer, names, grads, wstate, terms, weights,
                                         nonfinite=nonfinite,
                                         max_consecutive_skips=max_consecutive_skips)
    if method.level == "meta":
      metrics.update(meta_metrics)
    return new_state, metrics

  def evaluate(state: TrainState, batch):
    terms = task_terms(model, tasks, state.params, state.batch_stats, batch, train=False)
    metrics = {name: task.metrics_fn(terms.outputs[name], batch) for name, task in tasks.items()}
    predictions = {name: task.predict_fn(terms.outputs[name])
                   for name, task in tasks.items() if task.evaluator is not None}
    return metrics, predictions

  replicated = NamedSharding(mesh, PartitionSpec())
  data = NamedSharding(mesh, PartitionSpec("data"))
  jitted_step = jax.jit(step, in_shardings=(replicated, data), out_shardings=replicated,
                        donate_argnums=(0,) if donate else ())
  jitted_eval = jax.jit(evaluate, in_shardings=(replicated, data), out_shardings=replicated)

  def train_step(state, batch, meta_batch=None):
    if method.level == "meta" and meta_batch is None:
      raise ValueError("meta_batch: a meta-level method's step needs a meta batch")
    return jitted_step(state, (batch, meta_batch))

  return Trainer(init, train_step, jitted_eval, grad_level)
