"""GradNorm (Chen et al., 2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "gradnorm"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def _spread(weights, norms):
  g = weights * norms
  return float(jnp.std(g) / jnp.mean(g))


def test_reduces_the_spread_of_weighted_gradient_norms():
  method = weighting.get(NAME)
  scales = jnp.array([0.2, 1.0, 5.0])
  grads = scales[:, None] * jax.random.normal(KEY, (3, 30))
  norms = jnp.linalg.norm(grads, axis=1)
  losses = jnp.array([1.0, 2.0, 0.5])  # constant: equal training rates, target = mean norm
  state = method.init(3)
  update = jax.jit(method.update)
  spreads = []
  for _ in range(150):
    combined, state, w = update(grads, state, losses=losses, key=KEY)
    np.testing.assert_allclose(jnp.sum(state.weights), 3.0, rtol=1e-5)
    assert bool(jnp.all(state.weights > 0))
    spreads.append(_spread(w, norms))
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-5)
  assert spreads[0] > 1.0
  assert spreads[-1] < 0.1 * spreads[0]
  assert max(spreads[-20:]) < 0.2


def test_initial_losses_and_the_first_step():
  lr = 0.01
  method = weighting.get(NAME, lr=lr)
  grads = jnp.stack([jnp.ones(4), 3.0 * jnp.ones(4)])
  losses = jnp.array([2.0, 1.0])
  combined, state, w = method.update(grads, method.init(2), losses=losses, key=KEY)
  np.testing.assert_array_equal(w, jnp.ones(2))
  np.testing.assert_allclose(combined, grads.sum(0), rtol=1e-6)
  np.testing.assert_array_equal(state.initial_losses, losses)
  # r_t = 1, target = mean(G) = 4: ∂L_grad/∂w = (-2, +6); Adam's first step is -lr·sign, then
  # renormalisation to Σw = 2 (already the case).
  np.testing.assert_allclose(state.weights, [1 + lr, 1 - lr], rtol=1e-5)
  _, state2, _ = method.update(grads, state, losses=0.5 * losses, key=KEY)
  np.testing.assert_array_equal(state2.initial_losses, losses)  # kept from the first call


def test_slower_task_gets_the_larger_gradient_norm():
  # Equal gradient norms; task 1's loss stays, task 0's falls: r_1 > r_0, so G_1 > G_0.
  method = weighting.get(NAME, alpha=1.5)
  grads = jnp.stack([jnp.ones(5), -jnp.ones(5)])
  state = method.init(2)
  update = jax.jit(method.update)
  for k in range(60):
    _, state, w = update(grads, state, losses=jnp.array([0.97 ** k, 1.0]), key=KEY)
  assert float(w[1]) > 1.2 > 0.8 > float(w[0])
