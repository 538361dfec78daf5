"""A two-task linear model with a closed-form meta-gradient, shared by the meta-level tests.

Two 'tasks' read one linear map, ``out_t = x @ θ[:, t]``, with squared losses: every gradient
is explicit, so the tests check :mod:`mtjax.train.meta` against float64 numpy.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.tasks.base import Task
from mtjax.train.state import TrainState


class Linear(nn.Module):
  """``{"a": x @ θ[:, 0], "b": x @ θ[:, 1]}``; θ is shared (no task-owned parameters)."""

  @nn.compact
  def __call__(self, x, train=True):
    y = nn.Dense(2, use_bias=False)(x)
    return {"a": y[:, 0], "b": y[:, 1]}

  def param_label(self, path):
    del path
    return "shared"


def sq_task(name):
  loss = lambda out, batch: 0.5 * jnp.mean((out - batch[name]) ** 2)  # noqa: E731
  return Task(name, None, loss, None, None, lambda size: {name: ((), jnp.float32)}, {})


class Problem(NamedTuple):
  model: Linear
  tasks: dict
  batch: dict
  meta_batch: dict
  params: dict


def problem(seed=0, n=16, d=5) -> Problem:
  rng = np.random.default_rng(seed)
  def draw():
    return {"image": rng.normal(size=(n, d)), "a": rng.normal(size=n), "b": rng.normal(size=n)}
  batch, meta_batch = (jax.tree_util.tree_map(jnp.float32, draw()) for _ in range(2))
  model = Linear()
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  return Problem(model, {"a": sq_task("a"), "b": sq_task("b")}, batch, meta_batch, params)


def state_of(p: Problem, weighting_state, params=None) -> TrainState:
  return TrainState(jnp.int32(0), p.params if params is None else params, {}, None,
                    weighting_state, jax.random.PRNGKey(0))


def theta(p: Problem) -> np.ndarray:
  return np.asarray(p.params["Dense_0"]["kernel"], np.float64)  # (d, 2)


def losses(batch, th) -> np.ndarray:
  """(2,) float64 task losses of ``batch`` at ``th``."""
  x = np.asarray(batch["image"], np.float64)
  return np.array([0.5 * np.mean((x @ th[:, t] - np.asarray(batch[k], np.float64)) ** 2)
                   for t, k in enumerate("ab")])


def grads(batch, th) -> list:
  """Per-task float64 gradients ``∇_θ L_t`` (each ``(d, 2)``, only column t non-zero)."""
  x = np.asarray(batch["image"], np.float64)
  out = []
  for t, name in enumerate("ab"):
    g = np.zeros_like(th)
    g[:, t] = x.T @ (x @ th[:, t] - np.asarray(batch[name], np.float64)) / x.shape[0]
    out.append(g)
  return out


def d_meta_d_weights(p: Problem, th, weights, alpha) -> np.ndarray:
  """``D[i, t] = ∂F_i(θ')/∂w_t = −α <∇F_i(θ'), ∇L_t(θ)>`` at ``θ' = θ − α Σ_t w_t ∇L_t(θ)``."""
  g = grads(p.batch, th)
  th_new = th - alpha * sum(w * gt for w, gt in zip(weights, g, strict=True))
  gv = grads(p.meta_batch, th_new)
  return np.array([[-alpha * np.sum(gv[i] * g[t]) for t in range(2)] for i in range(2)])
