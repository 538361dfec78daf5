"""Loss-level weighting: the weights come from the losses alone (one backward pass)."""

import jax.numpy as jnp

from mtjax.weighting.base import EmptyState, Method, combine_or_none


def ew() -> Method:
  """Equal weighting (linear scalarisation): ``L = Σ_t L_t``, every weight 1."""
  def init(num_tasks, grads_like=None):
    del num_tasks, grads_like
    return EmptyState()

  def update(task_grads, state, *, losses, key=None):
    del key
    weights = jnp.ones_like(jnp.asarray(losses, jnp.float32))
    return combine_or_none(task_grads, weights), state, weights

  return Method(init, update, "loss")


def fixed(weights=None) -> Method:
  """Fixed task weights ``L = Σ_t λ_t L_t``; ``weights=None`` means all ones (equal weights)."""
  def init(num_tasks, grads_like=None):
    del grads_like
    if weights is not None and len(weights) != num_tasks:
      raise ValueError(f"fixed: 'weights' has {len(weights)} entries, expected one per task "
                       f"({num_tasks})")
    return EmptyState()

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    w = jnp.ones_like(losses) if weights is None else jnp.asarray(weights, jnp.float32)
    return combine_or_none(task_grads, w), state, w

  return Method(init, update, "loss")


METHODS = {"ew": ew, "fixed": fixed}
