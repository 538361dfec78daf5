"""Meta-level weighting: task weights learned from a meta (upper-level) objective.

Each method's :class:`~mtjax.weighting.base.MetaSpec` (``method.meta``) says what it learns
(``learned(state)``), how that gives the task weights of the lower-level step
(``weights(learned, state, losses)``) and its upper-level objective on the meta batch's task
losses; :mod:`mtjax.train.meta` computes the meta information (an exact meta-gradient through a
lookahead step, or first-order value-function quantities) and passes it to ``update`` as
``task_grads``. ``update`` is called with the train batch's ``losses`` and returns the new
weights (``combined = None``: the model's gradient is ``∇ Σ_t w_t L_t``) or, for FORUM, a
:class:`~mtjax.weighting.base.MetaDirection`. Called with ``task_grads=None``, ``update``
returns the current weights unchanged.
"""

from typing import NamedTuple

import jax.numpy as jnp

from mtjax.weighting.base import MetaSpec, Method, adam_step


def _primary_mask(name, primary_tasks, num_tasks):
  if primary_tasks is not None and not all(0 <= i < num_tasks for i in primary_tasks):
    raise ValueError(f"{name}: 'primary_tasks' {primary_tasks} are not task indices "
                     f"in [0, {num_tasks})")
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  return (jnp.ones_like(zeros) if primary_tasks is None
          else zeros.at[jnp.asarray(primary_tasks)].set(1.0))


def _primary_objective(state, meta_losses):
  return jnp.sum(state.primary * meta_losses)


# --- Auto-Lambda -----------------------------------------------------------------------------

class AutoLambdaState(NamedTuple):
  weights: jnp.ndarray
  primary: jnp.ndarray
  mu: jnp.ndarray
  nu: jnp.ndarray
  count: jnp.ndarray


AUTO_LAMBDA_SPEC = MetaSpec(learned=lambda state: state.weights,
                            weights=lambda learned, state, losses: learned,
                            objective=_primary_objective)


def auto_lambda(weight_init=0.1, meta_lr=1e-4, primary_tasks=None) -> Method:
  """Auto-Lambda (Liu, Johns & Davison, 2022): weights λ that minimise the meta loss.

  The meta loss is ``Σ_{i ∈ primary} L_i(θ'; meta batch)`` after one lookahead step
  ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ; train batch)`` (Eq. 3 of the paper); its gradient with
  respect to λ is computed exactly, second-order terms included, by
  :func:`mtjax.train.meta.meta_gradient` (the paper's code approximates it by finite
  differences). ``update`` takes that gradient as ``task_grads`` (shape ``(T,)``) and applies
  one Adam step to λ (``meta_lr=1e-4``, ``weight_init=0.1`` as in the official code); the
  returned weights then scale the task losses of the ordinary update. ``primary_tasks``: the
  indices of the tasks whose validation loss is the meta objective (None: all, the multi-task
  setting). Called with ``task_grads=None`` it returns the current weights unchanged.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    primary = _primary_mask("auto_lambda", primary_tasks, num_tasks)
    zeros = jnp.zeros((num_tasks,), jnp.float32)
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

  return Method(init, update, "meta", AUTO_LAMBDA_SPEC)


METHODS = {"auto_lambda": auto_lambda}
