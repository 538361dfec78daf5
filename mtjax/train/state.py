"""The train state: one pytree holding everything a resumed run needs."""

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
  """Params, batch statistics, optimizer and weighting states, the step and the root PRNG key.

  Per-step randomness is ``jax.random.fold_in(key, step)``; nothing draws keys any other way.
  Made by ``make_trainer(...).init(key)`` (:mod:`mtjax.train.trainer`).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  weighting_state: Any
  key: jax.Array
