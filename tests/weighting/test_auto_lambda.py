"""Auto-Lambda: the exact meta-gradient (closed form on a linear model) and the λ update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.tasks.base import Task
from mtjax.train import meta as meta_lib
from mtjax.train.state import TrainState


class _Linear(nn.Module):
  """Two 'tasks' reading one linear map: out_t = x @ θ[:, t]."""

  @nn.compact
  def __call__(self, x, train=True):
    y = nn.Dense(2, use_bias=False)(x)
    return {"a": y[:, 0], "b": y[:, 1]}


def _sq_task(name):
  loss = lambda out, batch: 0.5 * jnp.mean((out - batch[name]) ** 2)  # noqa: E731
  return Task(name, None, loss, None, None, lambda size: {name: ((), jnp.float32)}, {})


def test_meta_gradient_matches_the_closed_form():
  rng = np.random.default_rng(0)
  n, d = 16, 5
  model, tasks = _Linear(), {"a": _sq_task("a"), "b": _sq_task("b")}
  batch = {"image": rng.normal(size=(n, d)), "a": rng.normal(size=n), "b": rng.normal(size=n)}
  meta_batch = {"image": rng.normal(size=(n, d)), "a": rng.normal(size=n),
                "b": rng.normal(size=n)}
  batch, meta_batch = (jax.tree_util.tree_map(jnp.float32, b) for b in (batch, meta_batch))
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  method = weighting.get("auto_lambda", weight_init=0.7, primary_tasks=(1,))
  wstate = method.init(2)
  state = TrainState(jnp.int32(0), params, {}, None, wstate, jax.random.PRNGKey(0))
  alpha = 0.3
  got = meta_lib.meta_gradient(model, tasks, state, batch, meta_batch, alpha)

  theta = np.asarray(params["Dense_0"]["kernel"], np.float64)  # (d, 2)
  x, xv = np.asarray(batch["image"], np.float64), np.asarray(meta_batch["image"], np.float64)
  grad_t = []  # ∇_θ L_t on the train batch: only column t is non-zero
  for t, name in enumerate("ab"):
    g = np.zeros_like(theta)
    g[:, t] = x.T @ (x @ theta[:, t] - np.asarray(batch[name])) / n
    grad_t.append(g)
  lam = np.array([0.7, 0.7])
  theta_new = theta - alpha * (lam[0] * grad_t[0] + lam[1] * grad_t[1])
  g_val = np.zeros_like(theta)  # ∇ of the primary (task b) meta loss at θ'
  g_val[:, 1] = xv.T @ (xv @ theta_new[:, 1] - np.asarray(meta_batch["b"])) / n
  expected = np.array([-alpha * np.sum(g_val * grad_t[t]) for t in range(2)])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-7)
  assert got[0] == 0.0  # task a cannot change the primary task's loss through θ[:, 1]


def test_update_takes_an_adam_step_against_the_meta_gradient():
  method = weighting.get("auto_lambda")
  state = method.init(3)
  np.testing.assert_allclose(state.weights, 0.1)
  combined, same, weights = method.update(None, state, losses=jnp.ones(3), key=None)
  assert combined is None and same is state
  _, new, weights = method.update(jnp.array([1.0, -2.0, 0.0]), state, losses=None, key=None)
  np.testing.assert_allclose(weights, [0.1 - 1e-4, 0.1 + 1e-4, 0.1], rtol=1e-5)
  assert int(new.count) == 1
  assert jnp.all(jnp.isfinite(jax.jit(method.update)(jnp.zeros(3), state, losses=None,
                                                     key=None)[2]))


def test_primary_tasks_are_checked():
  np.testing.assert_array_equal(weighting.get("auto_lambda", primary_tasks=(0, 2)).init(3).primary,
                                [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="primary_tasks"):
    weighting.get("auto_lambda", primary_tasks=(3,)).init(3)
