"""PCGrad (Yu et al., 2020): closed form for T=2, no remaining conflict, vector reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.weighting.base import gram
from mtjax.weighting.gradient_surgery import pcgrad_coefficients, task_orders
from tests.weighting import common

_METHOD = weighting.get("pcgrad")
_JIT_UPDATE = jax.jit(_METHOD.update)


def _update(x, key):
  x = jnp.asarray(x, jnp.float32)
  return _JIT_UPDATE(x, _METHOD.init(x.shape[0]), losses=jnp.ones(x.shape[0]), key=key)


def _reference(grads, orders):
  """Algorithm 1 written on vectors, in float64, visiting the tasks in ``orders``."""
  grads = np.asarray(grads, np.float64)
  projected = grads.copy()
  for i in range(len(grads)):
    for j in np.asarray(orders[i]):
      if j == i:
        continue
      dot = projected[i] @ grads[j]
      if dot < 0:
        projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
  return projected


def _split(x):
  """A dict pytree holding the columns of a (T, D) matrix, D >= 12."""
  return {"a": x[:, :12].reshape(-1, 3, 4), "b": x[:, 12:]}


def _flat(tree):
  return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree_util.tree_leaves(tree)])


@jax.jit
@jax.vmap
def _projected(x, key):
  """The projected gradients g_i' (rows) and the task orders, for a batch of problems."""
  orders = task_orders(key, x.shape[0])
  return pcgrad_coefficients(gram(x), orders) @ x, orders


def test_two_tasks_closed_form_and_no_conflict_left():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 2, 30))
  keys = jax.random.split(jax.random.PRNGKey(0), 20)
  combined, _, weights = jax.vmap(_update)(jnp.asarray(x, jnp.float32), keys)
  projected = np.asarray(_projected(jnp.asarray(x, jnp.float32), keys)[0])
  dots = np.einsum("bd,bd->b", x[:, 0], x[:, 1])
  assert np.any(dots < 0) and np.any(dots > 0)
  for (g1, g2), dot, out, w, proj in zip(x, dots, combined, weights, projected, strict=True):
    if dot < 0:
      expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    else:
      expected = g1 + g2
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w @ np.stack([g1, g2]), out, rtol=1e-4, atol=1e-5)
    # Each projected g_i' no longer conflicts with the other original gradient.
    assert proj[0] @ g2 >= -1e-5 * (g2 @ g2)
    assert proj[1] @ g1 >= -1e-5 * (g1 @ g1)


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_matches_vector_implementation_with_same_order(num_tasks):
  rng = np.random.default_rng(num_tasks)
  x = rng.normal(size=(6, num_tasks, 20)) * rng.uniform(0.1, 10.0, size=(6, num_tasks, 1))
  keys = jax.random.split(jax.random.PRNGKey(num_tasks), 6)
  projected, orders = _projected(jnp.asarray(x, jnp.float32), keys)
  for xb, order, proj in zip(x, np.asarray(orders), np.asarray(projected), strict=True):
    expected = _reference(xb, order)
    np.testing.assert_allclose(proj, expected, rtol=1e-3, atol=1e-4)


def test_order_comes_from_key_only():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 6))  # many conflicts in a small space: the order matters
  results = [np.asarray(_update(x, jax.random.PRNGKey(s))[0]) for s in range(8)]
  again = np.asarray(_update(x, jax.random.PRNGKey(0))[0])
  np.testing.assert_array_equal(results[0], again)
  assert max(np.abs(r - results[0]).max() for r in results) > 1e-3
  # Every row of the order is a permutation of the tasks.
  orders = np.asarray(task_orders(jax.random.PRNGKey(3), 5))
  assert all(sorted(row) == list(range(5)) for row in orders)


def test_adversarial_inputs_stay_finite():
  rng = np.random.default_rng(2)
  g1, g2 = rng.normal(size=(2, 40))
  key = jax.random.PRNGKey(0)
  cases = {"conflicting": np.stack([g1, -g1 + 0.1 * g2]), **common.pair_cases(g1, g2),
           "all_zero": np.zeros((3, 40))}
  for name, x in cases.items():
    combined, _, weights = _update(x, key)
    assert np.all(np.isfinite(combined)) and np.all(np.isfinite(weights)), name
  np.testing.assert_allclose(_update(cases["identical"], key)[0], 2 * g1, rtol=1e-5)
  np.testing.assert_allclose(_update(cases["zero"], key)[0], g1, rtol=1e-5)
  np.testing.assert_allclose(_update(cases["single"], key)[0], g1, rtol=1e-6)
  np.testing.assert_allclose(_update(cases["opposite"], key)[0], 0.0, atol=1e-5)


def test_jit_vmap_and_pytree_agree():
  method = weighting.get("pcgrad")
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.normal(size=(4, 3, 20)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  state = method.init(3)
  losses = jnp.ones(3)
  eager = method.update(xs[0], state, losses=losses, key=keys[0])
  jitted = [_update(x, k) for x, k in zip(xs, keys, strict=True)]
  np.testing.assert_allclose(jitted[0][0], eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jitted[0][2], eager[2], rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda x, k: method.update(x, state, losses=losses, key=k))(xs, keys)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched[2], np.stack([j[2] for j in jitted]), rtol=1e-5, atol=1e-6)
  tree_out = _JIT_UPDATE(_split(xs[0]), state, losses=losses, key=keys[0])
  np.testing.assert_allclose(_flat(tree_out[0]), eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tree_out[2], eager[2], rtol=1e-5, atol=1e-6)


def test_requires_key():
  with pytest.raises(ValueError, match="key"):
    _METHOD.update(jnp.ones((2, 3)), _METHOD.init(2), losses=jnp.ones(2), key=None)
