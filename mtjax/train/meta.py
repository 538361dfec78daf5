"""The train step of meta-level methods (Auto-Lambda): a lookahead step, differentiated exactly.

``step(state, batch, meta_batch)``: the meta-gradient of the primary tasks' loss on
``meta_batch``, after one virtual optimizer step on ``batch`` with weights λ, is taken with
respect to λ by ``jax.grad`` through the whole lookahead (second-order terms included; no finite
differences, no model copies); the method updates λ; then the ordinary weighted update follows.
"""

import jax
import jax.numpy as jnp

from mtjax.train.state import TrainState
from mtjax.train.step import apply_gradients, jit_step, task_gradients
from mtjax.weighting.base import Method


def task_losses(model, tasks, params, batch_stats, batch):
  """(T,) task losses of one training-mode forward pass (batch statistics are not kept)."""
  outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                           train=True, mutable=["batch_stats"])
  return jnp.stack([task.loss_fn(outputs[name], batch).astype(jnp.float32)
                    for name, task in tasks.items()])


def meta_gradient(model, tasks, state: TrainState, batch, meta_batch, lookahead_lr):
  """``∂/∂λ Σ_i primary_i L_i(θ'; meta_batch)`` with ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ; batch)``.

  The virtual step is plain gradient descent with the current learning rate α, as in the
  official Auto-Lambda code (it adds SGD's momentum buffer when there is one; differentiating
  through Adam's ``sqrt`` of a zero second moment would give NaN).
  """
  def meta_loss(weights):
    def train_loss(params):
      return jnp.sum(weights * task_losses(model, tasks, params, state.batch_stats, batch))
    grads = jax.grad(train_loss)(state.params)
    lookahead = jax.tree_util.tree_map(lambda p, g: p - lookahead_lr * g, state.params, grads)
    losses = task_losses(model, tasks, lookahead, state.batch_stats, meta_batch)
    return jnp.sum(state.weighting_state.primary * losses)

  return jax.grad(meta_loss)(state.weighting_state.weights)


def make_meta_train_step(model, tasks, method, optimizer, *, lookahead_lr, mesh=None,
                         donate=True):
  """A jitted ``step(state, batch, meta_batch) -> (state, metrics)`` for a "meta" method.

  ``lookahead_lr``: the virtual step's learning rate, a float or a schedule of the step (pass
  the optimizer's schedule).
  """
  if method.level != "meta":
    raise ValueError(f"make_meta_train_step: expects a 'meta' level method, got {method.level!r}")
  names = tuple(tasks)

  def step(state: TrainState, batches):
    batch, meta_batch = batches
    key = jax.random.fold_in(state.key, state.step)
    alpha = lookahead_lr(state.step) if callable(lookahead_lr) else lookahead_lr
    meta_grad = meta_gradient(model, tasks, state, batch, meta_batch, alpha)
    _, wstate, weights = method.update(meta_grad, state.weighting_state, losses=None, key=key)
    as_loss_weights = Method(method.init, lambda g, s, *, losses, key: (None, s, weights), "loss")
    grads, _, batch_stats, losses, _ = task_gradients(model, tasks, as_loss_weights, "parameter",
                                                      state, batch, key)
    new_state, metrics = apply_gradients(state, optimizer, names, grads, wstate, batch_stats,
                                         losses, weights)
    for i, name in enumerate(names):
      metrics[f"meta_grad/{name}"] = meta_grad[i]
    return new_state, metrics

  jitted = jit_step(step, mesh, donate)
  return lambda state, batch, meta_batch: jitted(state, (batch, meta_batch))
