"""Meta-level weighting: task weights learned by a meta-gradient through a lookahead step.

A meta-level method's state carries ``weights`` (the current task weights λ) and ``primary``
(a (T,) mask of the tasks whose loss is the meta objective); its ``update`` takes the
meta-gradient ``∂ meta_loss / ∂λ`` as ``task_grads``. :mod:`mtjax.train.meta` computes it.
"""

from typing import NamedTuple

import jax.numpy as jnp

from mtjax.weighting.base import Method, adam_step


class AutoLambdaState(NamedTuple):
  weights: jnp.ndarray
  primary: jnp.ndarray
  mu: jnp.ndarray
  nu: jnp.ndarray
  count: jnp.ndarray


def auto_lambda(weight_init=0.1, meta_lr=1e-4, primary_tasks=None) -> Method:
  """Auto-Lambda (Liu, Johns & Davison, 2022): weights λ that minimise the meta loss.

  The meta loss is ``Σ_{i ∈ primary} L_i(θ'; meta batch)`` after one lookahead step
  ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ; train batch)`` (Eq. 3 of the paper); its gradient with
  respect to λ is computed exactly, second-order terms included, by
  :func:`mtjax.train.meta.make_meta_train_step` (the paper's code approximates it by finite
  differences). ``update`` takes that gradient as ``task_grads`` (shape ``(T,)``) and applies
  one Adam step to λ (``meta_lr=1e-4``, ``weight_init=0.1`` as in the official code); the
  returned weights then scale the task losses of the ordinary update. ``primary_tasks``: the
  indices of the tasks whose validation loss is the meta objective (None: all, the multi-task
  setting). Called with ``task_grads=None`` it returns the current weights unchanged.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    if primary_tasks is not None and not all(0 <= i < num_tasks for i in primary_tasks):
      raise ValueError(f"auto_lambda: 'primary_tasks' {primary_tasks} are not task indices "
                       f"in [0, {num_tasks})")
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    primary = (jnp.ones_like(zeros) if primary_tasks is None
               else zeros.at[jnp.asarray(primary_tasks)].set(1.0))
    return AutoLambdaState(jnp.full((num_tasks,), weight_init, jnp.float32), primary, zeros,
                           zeros, jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses=None, key=None):
    del losses, key
    if task_grads is None:
      return None, state, state.weights
    meta_grad = jnp.asarray(task_grads, jnp.float32)
    weights, mu, nu, count = adam_step(state.weights, meta_grad, state.mu, state.nu,
                                       state.count, meta_lr)
    return None, AutoLambdaState(weights, state.primary, mu, nu, count), weights

  return Method(init, update, "meta")


METHODS = {"auto_lambda": auto_lambda}
