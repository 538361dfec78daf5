"""IMTL-G, impartial multi-task learning (Liu et al., 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "imtl"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

_UPDATE = jax.jit(weighting.get(NAME).update)


def _projections(direction, grads):
  unit = grads / jnp.linalg.norm(grads, axis=1, keepdims=True)
  return unit @ direction


def _paper_alpha(grads):
  """The closed form of Liu et al. (2021), in float64 numpy: α_{2:T} = g_1 U^T (D U^T)^{-1}."""
  g = np.asarray(grads, np.float64)
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d_mat, u_mat = g[:1] - g[1:], u[:1] - u[1:]
  rest = g[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.concatenate([[1 - rest.sum()], rest])


@pytest.mark.parametrize("seed", range(5))
def test_equal_projections_on_every_unit_gradient(seed):
  grads = jax.random.normal(jax.random.PRNGKey(seed), (3, 50))
  grads = grads * jnp.array([[0.1], [1.0], [10.0]])  # unequal scales
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  proj = _projections(combined, grads)
  # Tolerance: float32 solve of a well-conditioned 3x3 cosine system.
  np.testing.assert_allclose(proj, jnp.full(3, jnp.mean(proj)), rtol=1e-4)
  np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-5)
  np.testing.assert_allclose(w, _paper_alpha(grads), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-5)


def test_identical_gradients_give_the_mean():
  g = jax.random.normal(KEY, (40,))
  grads = jnp.stack([g, g, g, g])
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(4), losses=jnp.ones(4), key=KEY)
  np.testing.assert_allclose(w, jnp.full(4, 0.25), rtol=1e-4)
  np.testing.assert_allclose(combined, g, rtol=1e-4, atol=1e-6)


def test_zero_gradient_is_finite_and_ignored():
  k1, k2 = jax.random.split(KEY)
  a, b = jax.random.normal(k1, (30,)), jax.random.normal(k2, (30,))
  grads = jnp.stack([a, jnp.zeros(30), b])
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  assert bool(jnp.all(jnp.isfinite(w)) & jnp.all(jnp.isfinite(combined)))
  assert float(w[1]) == 0.0
  proj = _projections(combined, grads[jnp.array([0, 2])])
  np.testing.assert_allclose(proj[0], proj[1], rtol=1e-4)
  # All zero: uniform weights, zero direction.
  _, _, w0 = _UPDATE(jnp.zeros((3, 5)), weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w0, jnp.full(3, 1 / 3), rtol=1e-6)


def test_single_task_and_global_scale():
  g = jax.random.normal(KEY, (1, 9))
  combined, _, w = _UPDATE(g, weighting.get(NAME).init(1), losses=jnp.ones(1), key=KEY)
  np.testing.assert_allclose(w, [1.0], rtol=1e-6)
  np.testing.assert_allclose(combined, g[0], rtol=1e-6)
  grads = jax.random.normal(jax.random.PRNGKey(9), (3, 20))
  _, _, w1 = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  _, _, w2 = _UPDATE(1e4 * grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w1, w2, rtol=1e-4)


def test_conflicting_gradients_two_tasks():
  # For T = 2 the projections are equal iff the direction bisects the two unit gradients.
  grads = jnp.array([[1.0, 0.0], [-3.0, 1.0]])
  combined, _, _ = _UPDATE(grads, weighting.get(NAME).init(2), losses=jnp.ones(2), key=KEY)
  proj = _projections(combined, grads)
  np.testing.assert_allclose(proj[0], proj[1], rtol=1e-5)
