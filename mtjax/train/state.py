"""The train state: one pytree holding everything a resumed run needs."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.models.multitask import SHARED


class TrainState(NamedTuple):
  """Params, batch statistics, optimizer and weighting states, the step and the root PRNG key.

  Per-step randomness is ``jax.random.fold_in(key, step)``; nothing draws keys any other way.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  weighting_state: Any
  key: jax.Array


def zero_gradient(model, params, batch_stats, *, grad_level, image_shape, batch_size):
  """Zeros shaped like one task's gradient at ``grad_level``: what ``method.init`` receives.

  The shared parameters at the parameter level, the shared features of a global batch at the
  representation level. Made on the host, so no computation is compiled.
  """
  if grad_level == "representation":
    features = jax.eval_shape(
        lambda p, s: model.apply({"params": p, "batch_stats": s},
                                 jnp.zeros((batch_size, *image_shape)), method="encode"),
        params, batch_stats)
    return jnp.asarray(np.zeros(features.shape, features.dtype))
  return jax.tree_util.tree_map(lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)),
                                params[SHARED])


def create(model, task_names, method, optimizer, *, key, image_shape, batch_size,
           grad_level="parameter") -> TrainState:
  """A fresh state; ``key`` seeds the parameters and becomes the root key of the run.

  ``image_shape`` is (H, W, C); ``batch_size`` the global batch, needed by methods that keep
  per-task statistics of representation-level gradients (their shape includes the batch).
  """
  init_key, root_key = jax.random.split(key)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  grads_like = zero_gradient(model, params, batch_stats, grad_level=grad_level,
                             image_shape=image_shape, batch_size=batch_size)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=optimizer.init(params),
      weighting_state=method.init(len(task_names), grads_like),
      key=root_key,
  )
  # One buffer per leaf: a method's init may reuse an array (``zeros, zeros``), and the train
  # step donates the state, which fails on a buffer passed twice.
  return jax.tree_util.tree_map(jnp.copy, state)
