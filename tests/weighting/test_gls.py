"""Geometric loss strategy (Chennupati et al., 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "gls"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def _geometric_mean(losses):
  return jnp.prod(losses) ** (1.0 / losses.shape[0])


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_weights_are_the_derivative_of_the_geometric_mean(num_tasks):
  losses = jax.random.uniform(jax.random.PRNGKey(num_tasks), (num_tasks,), minval=0.05, maxval=5)
  method = weighting.get(NAME)
  grads = jax.random.normal(KEY, (num_tasks, 7))
  combined, _, weights = method.update(grads, method.init(num_tasks), losses=losses, key=KEY)
  np.testing.assert_allclose(weights, jax.grad(_geometric_mean)(losses), rtol=1e-5)
  np.testing.assert_allclose(combined, weights @ grads, rtol=1e-5, atol=1e-6)


def test_weights_are_scale_free_and_favour_small_losses():
  method = weighting.get(NAME)
  losses = jnp.array([0.1, 1.0, 10.0])
  _, _, w = method.update(None, method.init(3), losses=losses, key=KEY)
  _, _, w_scaled = method.update(None, method.init(3), losses=1e3 * losses, key=KEY)
  np.testing.assert_allclose(w, w_scaled, rtol=1e-5)  # ∂L/∂L_t is homogeneous of degree 0
  assert bool(jnp.all(jnp.diff(w) < 0))


def test_zero_and_extreme_losses_stay_finite():
  method = weighting.get(NAME)
  for losses in ([0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1e-30, 1e30, 1.0], [1e-20, 1e-20, 1e-20]):
    _, _, w = method.update(None, method.init(3), losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w)) & jnp.all(w > 0)), losses


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(weighting.get(NAME))
