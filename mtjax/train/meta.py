"""The meta-gradient of meta-level methods (Auto-Lambda): a lookahead step, differentiated exactly.

The meta-gradient of the primary tasks' loss on a meta batch, after one virtual optimizer step
on the train batch with weights λ, is taken with respect to λ by ``jax.grad`` through the whole
lookahead (second-order terms included; no finite differences, no model copies). The train
step (:func:`mtjax.train.trainer.make_trainer`) then lets the method update λ and makes the
ordinary update with ``TaskTerms.combine(λ)``. Both passes use the one forward path,
:func:`mtjax.train.step.task_terms`.
"""

import jax
import jax.numpy as jnp

from mtjax.train.state import TrainState
from mtjax.train.step import task_terms


def task_losses(model, tasks, params, batch_stats, batch):
  """(T,) task losses of one training-mode forward pass (batch statistics are not kept)."""
  return task_terms(model, tasks, params, batch_stats, batch).losses


def meta_gradient(model, tasks, state: TrainState, batch, meta_batch, lookahead_lr, frozen=()):
  """``∂/∂λ Σ_i primary_i L_i(θ'; meta_batch)`` with ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ; batch)``.

  The virtual step is plain gradient descent with the current learning rate α, as in the
  official Auto-Lambda code (it adds SGD's momentum buffer when there is one; differentiating
  through Adam's ``sqrt`` of a zero second moment would give NaN). ``frozen`` groups do not
  move in the lookahead.
  """
  def meta_loss(weights):
    grads = task_terms(model, tasks, state.params, state.batch_stats, batch,
                       frozen=frozen).combine(weights)
    lookahead = jax.tree_util.tree_map(lambda p, g: p - lookahead_lr * g, state.params, grads)
    losses = task_losses(model, tasks, lookahead, state.batch_stats, meta_batch)
    return jnp.sum(state.weighting_state.primary * losses)

  return jax.grad(meta_loss)(state.weighting_state.weights)
