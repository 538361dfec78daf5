"""The meta information of meta-level methods, and their step.

A meta-level method states what it learns in its :class:`mtjax.weighting.base.MetaSpec`:
the upper-level variables ``learned(state)``, the lower-level task weights
``weights(learned, state, losses)`` and the upper-level ``objective(state, meta_losses)``.
This module computes what the spec's ``kind`` asks for:

* ``"lookahead"`` (Auto-Lambda, weight_net, MOML): :func:`meta_gradient`, the derivative of the
  objective on a meta batch after one virtual SGD step on the train batch with respect to
  ``learned``, by ``jax.jacrev`` through the whole lookahead (second-order terms included; no
  finite differences, no model copies). A vector objective gives one meta-gradient per entry.
* ``"value_function"`` (FORUM): :func:`value_function_info`, first-order quantities of the
  value-function reformulation (train losses before and after ``inner_steps`` virtual SGD
  steps, the Gram matrix of the meta batch's per-task gradients, their products with the
  train-batch gradient); no derivative through the lookahead.

:func:`meta_step` (called by the trainer's meta branch) hands that to ``method.update`` and
turns its result into the model's gradient: ``∇ Σ_t w_t L_t`` on the train batch, or a
:class:`~mtjax.weighting.base.MetaDirection`'s combination of train and meta batch gradients.
Every pass uses the one forward path, :func:`mtjax.train.step.task_terms`.

A method whose spec ``trains_on_meta`` (FORUM: the model moves along the meta batch's
gradients) gets both batches from one train batch, split in two halves (:func:`split_batch`),
as LibMTL's ``Trainer.train_bilevel`` draws its inner and outer batches at half the batch size:
every step then sees ``batch_size`` examples, as any other method's.
"""

import jax
import jax.numpy as jnp

from mtjax.train.state import TrainState
from mtjax.train.step import halves, task_terms
from mtjax.weighting.base import MetaSpec, ValueFunctionInfo, gram
from mtjax.weighting.meta import AUTO_LAMBDA_SPEC

# LibMTL stops FORUM's inner loop once the lower-level loss exceeds this ("caused by too large
# inner_lr and inner_step").
_INNER_LOSS_LIMIT = 1e5


def trains_on_meta(method) -> bool:
  """Whether ``method`` moves the model's weights along a meta batch's gradients."""
  return method.level == "meta" and method.meta is not None and method.meta.trains_on_meta


def draws_meta_batch(method) -> bool:
  """Whether the loop draws a separate meta batch (of ``config.meta_split``) for ``method``:
  a meta-level method's, unless it splits the train batch (:func:`trains_on_meta`)."""
  return method.level == "meta" and not trains_on_meta(method)


def split_batch(batch):
  """``(lower-level batch, meta batch)``: the two halves of ``batch`` (even and odd examples,
  :func:`mtjax.train.step.halves`: each device splits its own examples)."""
  return halves(batch)


def check_meta_split(method, meta_split: str) -> None:
  """Raises ValueError (``meta_split: ...``) when a method that trains on its meta batch
  would draw it from the validation split."""
  if trains_on_meta(method) and meta_split != "train":
    raise ValueError(
        f"meta_split: got {meta_split!r}, but this method moves the model's weights along the "
        "meta batch's gradients (it would train on the validation set); expected 'train' (its "
        "meta batch is the second half of each train batch)")


def check_batch(method, batch_size: int, num_devices: int) -> None:
  """Raises ValueError (``batch_size: ...``) unless :func:`split_batch` can halve the batch on
  every device."""
  if trains_on_meta(method) and batch_size % (2 * num_devices):
    raise ValueError(
        f"batch_size: got {batch_size} on {num_devices} device(s); the method's lower-level and "
        "meta batches are the two halves of each device's examples: expected a multiple of "
        f"{2 * num_devices}")


def task_losses(model, tasks, params, batch_stats, batch):
  """(T,) task losses of one training-mode forward pass (batch statistics are not kept)."""
  return task_terms(model, tasks, params, batch_stats, batch).losses


def _lr(spec: MetaSpec, lookahead_lr):
  return lookahead_lr if spec.lookahead_lr is None else spec.lookahead_lr


def meta_gradient(model, tasks, state: TrainState, batch, meta_batch, lookahead_lr, frozen=(),
                  spec: MetaSpec | None = None):
  """``∂/∂ℓ objective(L(θ'; meta_batch))`` with ``θ' = θ − α ∇_θ Σ_t w_t(ℓ) L_t(θ; batch)``.

  ``ℓ = spec.learned(state.weighting_state)``, ``w = spec.weights(ℓ, ·, L(θ; batch))``; the
  default spec is Auto-Lambda's (``ℓ = λ = w``, objective ``Σ_i primary_i L_i``). The result
  has ``ℓ``'s structure, with a leading axis ``K`` when the objective returns ``(K,)``.
  The virtual step is plain gradient descent with ``spec.lookahead_lr`` or else
  ``lookahead_lr`` (the trainer passes the optimizer's current rate, as the official
  Auto-Lambda code; it adds SGD's momentum buffer when there is one; differentiating through
  Adam's ``sqrt`` of a zero second moment would give NaN). ``frozen`` groups do not move.
  """
  spec = AUTO_LAMBDA_SPEC if spec is None else spec
  wstate = state.weighting_state
  alpha = _lr(spec, lookahead_lr)

  def objective(learned):
    terms = task_terms(model, tasks, state.params, state.batch_stats, batch, frozen=frozen)
    weights = spec.weights(learned, wstate, jax.lax.stop_gradient(terms.losses))
    grads = terms.combine(weights)
    lookahead = jax.tree_util.tree_map(lambda p, g: p - alpha * g, state.params, grads)
    losses = task_losses(model, tasks, lookahead, state.batch_stats, meta_batch)
    return spec.objective(wstate, losses)

  return jax.jacrev(objective)(spec.learned(wstate))


def _tree_dot(a, b):
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in leaves)


def value_function_info(model, tasks, state: TrainState, terms, batch, meta_batch, lookahead_lr,
                        spec: MetaSpec, frozen=()):
  """``(ValueFunctionInfo, meta-batch terms)`` of one step (see :class:`ValueFunctionInfo`).

  ``terms``: :func:`task_terms` of ``batch`` at the current parameters. The lower-level
  gradient ``∇_ω f = terms.combine(w)``; ``spec.inner_steps`` SGD steps of rate
  ``spec.lookahead_lr`` (else ``lookahead_lr``) on ``f(α, ·)`` with ``w`` fixed, stopping (as
  LibMTL) once ``f`` exceeds 1e5; the meta batch's per-task gradients of every parameter come
  from one ``jax.vmap`` of its ``combine`` over one-hot weights.
  """
  wstate = state.weighting_state
  alpha = _lr(spec, lookahead_lr)
  weights = jax.lax.stop_gradient(spec.weights(spec.learned(wstate), wstate, terms.losses))
  inner_grad = terms.combine(weights)

  def sgd(params, grads, stop):
    return jax.tree_util.tree_map(lambda p, g: jnp.where(stop, p, p - alpha * g), params, grads)

  stop = jnp.sum(weights * terms.losses) > _INNER_LOSS_LIMIT
  params = sgd(state.params, inner_grad, stop)

  # A Python loop (``inner_steps`` is static), not ``lax.fori_loop``: XLA's CPU backend ran the
  # convolutions of a while-loop body ≈ 30× slower (FORUM's step on the tiny setup: 92× an EW
  # step with fori_loop, 3.4× unrolled; benchmarks/step_time.py, 2026-11-29), for a compile
  # that grows with the steps instead.
  for _ in range(spec.inner_steps - 1):
    inner = task_terms(model, tasks, params, state.batch_stats, batch, frozen=frozen)
    stop = stop | (jnp.sum(weights * inner.losses) > _INNER_LOSS_LIMIT)
    params = sgd(params, inner.combine(weights), stop)
  inner_losses = task_losses(model, tasks, params, state.batch_stats, batch)

  meta_terms = task_terms(model, tasks, state.params, state.batch_stats, meta_batch,
                          frozen=frozen)
  num_tasks = meta_terms.losses.shape[0]
  per_task = jax.vmap(meta_terms.combine)(jnp.eye(num_tasks, dtype=meta_terms.losses.dtype))
  cross = jax.vmap(lambda g: _tree_dot(g, inner_grad))(per_task)
  info = ValueFunctionInfo(
      losses=jnp.asarray(terms.losses, jnp.float32),
      inner_losses=jnp.asarray(inner_losses, jnp.float32),
      meta_gram=gram(per_task), cross=cross, inner_sq=_tree_dot(inner_grad, inner_grad))
  return info, meta_terms


def meta_step(model, tasks, method, state: TrainState, terms, batch, meta_batch, lookahead_lr,
              key, frozen=()):
  """One meta-level step's ``(grads, weighting state, weights, metrics)``.

  ``terms``: :func:`task_terms` of ``batch`` at the current parameters (their losses are
  ``update``'s ``losses``). ``update`` gets :func:`meta_gradient` or
  :func:`value_function_info` as ``task_grads``; the model's gradient is
  ``terms.combine(weights)``, or for a returned :class:`MetaDirection` the sum of the train and
  meta batch combinations (weights and coefficients are constants: no gradient flows into them).
  ``metrics``: ``meta_grad/<task>`` when the meta-gradient is a ``(T,)`` vector (Auto-Lambda),
  else its norm ``meta_grad_norm`` (none for a value-function method).
  """
  spec = AUTO_LAMBDA_SPEC if method.meta is None else method.meta
  meta_terms = None
  if spec.kind == "lookahead":
    info = meta_gradient(model, tasks, state, batch, meta_batch, lookahead_lr, frozen, spec)
  elif spec.kind == "value_function":
    info, meta_terms = value_function_info(model, tasks, state, terms, batch, meta_batch,
                                           lookahead_lr, spec, frozen)
  else:
    raise ValueError(f"meta kind {spec.kind!r}; expected 'lookahead' or 'value_function'")
  combined, wstate, weights = method.update(info, state.weighting_state, losses=terms.losses,
                                            key=key)
  if combined is None:
    grads = terms.combine(jax.lax.stop_gradient(weights))
  else:
    grads = terms.combine(jax.lax.stop_gradient(combined.train))
    if meta_terms is None:
      meta_terms = task_terms(model, tasks, state.params, state.batch_stats, meta_batch,
                              frozen=frozen)
    meta_grads = meta_terms.combine(jax.lax.stop_gradient(combined.meta))
    grads = jax.tree_util.tree_map(jnp.add, grads, meta_grads)
  names = tuple(tasks)
  if isinstance(info, jax.Array) and info.shape == (len(names),):
    metrics = {f"meta_grad/{name}": info[i] for i, name in enumerate(names)}
  elif isinstance(info, ValueFunctionInfo):
    metrics = {}  # first order: no meta-gradient
  else:
    metrics = {"meta_grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                              for x in jax.tree_util.tree_leaves(info)))}
  return grads, wstate, weights, metrics
