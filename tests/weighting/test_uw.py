"""Uncertainty weighting (Kendall, Gal & Cipolla, 2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "uw"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def _objective(log_vars, losses):
  """Kendall et al. (2018) in LibMTL's form: Σ L_t / (2 exp(s_t)) + s_t / 2."""
  return jnp.sum(losses * jnp.exp(-log_vars) / 2 + log_vars / 2)


def test_weights_and_step_match_the_analytic_gradient():
  lr = 0.1
  method = weighting.get(NAME, lr=lr)
  state = method.init(3)
  np.testing.assert_allclose(state.log_vars, -0.5)  # LibMTL's initial value
  losses = jnp.array([0.3, 1.0, 4.0])
  grads = jax.random.normal(KEY, (3, 9))
  combined, new_state, weights = method.update(grads, state, losses=losses, key=KEY)
  # The effective weights are ∂objective/∂L_t = exp(-s_t) / 2.
  np.testing.assert_allclose(weights, jax.grad(_objective, argnums=1)(state.log_vars, losses),
                             rtol=1e-6)
  np.testing.assert_allclose(combined, weights @ grads, rtol=1e-5, atol=1e-6)
  expected = state.log_vars - lr * jax.grad(_objective)(state.log_vars, losses)
  np.testing.assert_allclose(new_state.log_vars, expected, rtol=1e-6, atol=1e-7)


def test_weight_falls_for_a_big_loss_and_rises_for_a_small_one():
  method = weighting.get(NAME)
  state = method.init(2)
  losses = jnp.array([10.0, 0.01])
  history = []
  for _ in range(10):
    _, state, weights = method.update(None, state, losses=losses, key=KEY)
    history.append(weights)
  history = np.stack(history)
  assert np.all(np.diff(history[:, 0]) < 0)
  assert np.all(np.diff(history[:, 1]) > 0)


def test_converges_to_the_stationary_point():
  # ∂objective/∂s_t = 0  <=>  exp(s_t) = L_t, so the weights tend to 1 / (2 L_t).
  method = weighting.get(NAME, lr=0.2)
  losses = jnp.array([0.5, 2.0])
  update = jax.jit(method.update)
  state = method.init(2)
  for _ in range(300):
    _, state, weights = update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(weights, 1 / (2 * losses), rtol=1e-3)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(weighting.get(NAME))
