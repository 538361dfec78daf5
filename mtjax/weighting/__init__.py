"""Task-balancing methods: a plain-dict registry of pure ``init``/``update`` pairs.

    method = mtjax.weighting.get("pcgrad")
    state = method.init(num_tasks)
    combined, state, weights = method.update(task_grads, state, losses=losses, key=key)
"""

import inspect

from mtjax.weighting import (
    gradient_surgery,
    gradient_weighting,
    loss_weighting,
    meta,
    multi_objective,
)
from mtjax.weighting.base import LEVELS, EmptyState, Method, gram, weighted_sum

_REGISTRY = {
    **loss_weighting.METHODS,
    **gradient_weighting.METHODS,
    **multi_objective.METHODS,
    **gradient_surgery.METHODS,
    **meta.METHODS,
}


def names() -> list[str]:
  """The registered method names, sorted."""
  return sorted(_REGISTRY)


def hparams(name: str) -> dict:
  """The hyperparameters of method ``name`` with their defaults."""
  factory = _factory(name)
  return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


def get(name: str, **kwargs) -> Method:
  """The method registered as ``name``, built with hyperparameters ``kwargs``."""
  factory = _factory(name)
  allowed = hparams(name)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"weighting method {name!r}: unknown hyperparameter(s) {unknown}; "
                     f"allowed: {sorted(allowed)}")
  return factory(**kwargs)


def _factory(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"unknown weighting method {name!r}; valid names: {names()}")
  return _REGISTRY[name]


__all__ = ["LEVELS", "EmptyState", "Method", "get", "gram", "hparams", "names", "weighted_sum"]
