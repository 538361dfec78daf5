"""The train state: one pytree holding everything a resumed run needs."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
  """Params, batch statistics, optimizer and weighting states, the step, the root PRNG key and
  the step's record of non-finite values (:class:`Health`).

  Per-step randomness is ``jax.random.fold_in(key, step)``; nothing draws keys any other way.
  Made by ``make_trainer(...).init(key)`` (:mod:`mtjax.train.trainer`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  weighting_state: Any
  key: jax.Array
  health: Any = None  # a Health (made by the trainer): what the step saw of non-finite values


class Health(NamedTuple):
  """What the train step saw of non-finite values, kept on device: the loop reads it only when it
  syncs anyway (logging, evaluation, checkpoint, report), so no step waits for the host.

  ``bad_step`` is the step (numbered as logged: 1 is the first update) at which the run must
  stop, -1 while it may go on: under ``nonfinite="stop"`` the first step whose task losses, combined
  gradient or updated parameters were not finite; under ``"skip"`` the step at which
  ``max_consecutive_skips`` updates in a row were skipped. ``bad_losses``, ``bad_grad`` and
  ``bad_params`` say what was not finite at that step. ``skipped`` counts the skipped updates,
  ``streak`` the consecutive ones ending at the last step (in the state, so resuming mid-streak is
  exact).
  """

  skipped: jax.Array      # int32
  streak: jax.Array       # int32
  bad_step: jax.Array     # int32, -1 while healthy
  bad_losses: jax.Array   # (T,) bool
  bad_grad: jax.Array     # bool
  bad_params: jax.Array   # bool


def healthy(num_tasks: int) -> Health:
  """The health of a state that has seen nothing non-finite."""
  return Health(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32),
                jnp.zeros((num_tasks,), bool), jnp.zeros((), bool), jnp.zeros((), bool))
