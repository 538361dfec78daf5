"""MoDo (Chen et al. 2023): λ ← Π_Δ(λ − γ (G λ + ρ λ)), d = Σ_t λ_t g_t with the new λ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.weighting.multi_objective import modo_lambda_step
from tests.weighting import common

NAME = "modo"


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME, gamma=0.05))


def _steps(method, jac, calls):
  update = jax.jit(method.update)
  state = method.init(jac.shape[0])
  out = []
  for i in range(calls):
    combined, state, weights = update(jnp.asarray(jac, jnp.float32), state,
                                      losses=jnp.ones(jac.shape[0]),
                                      key=jax.random.PRNGKey(i))
    out.append((np.asarray(combined), np.asarray(weights)))
  return out


def test_lambda_update_matches_the_float64_closed_form():
  jac = np.random.default_rng(0).normal(size=(3, 8))
  gamma, rho = 0.05, 0.1
  got = _steps(weighting.get(NAME, gamma=gamma, rho=rho), jac, calls=4)
  lam = np.full(3, 1 / 3)
  g = jac @ jac.T
  for combined, weights in got:
    lam = common.project_simplex(lam - gamma * (g @ lam + rho * lam))
    np.testing.assert_allclose(weights, lam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined, lam @ jac, rtol=1e-5, atol=1e-5)


def test_cross_gram_of_two_samples_is_used_as_given():
  """The double-sampling step: ``∇F(z₁)ᵀ ∇F(z₂) λ`` with a non-symmetric cross product."""
  rng = np.random.default_rng(1)
  j1, j2 = rng.normal(size=(2, 3, 6))
  lam = np.array([0.2, 0.5, 0.3])
  got = modo_lambda_step(jnp.asarray(j1 @ j2.T), jnp.asarray(lam), 0.1, 0.2)
  expected = common.project_simplex(lam - 0.1 * (j1 @ (j2.T @ lam) + 0.2 * lam))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_weights_stay_on_the_simplex():
  for name, grads in common.adversarial_grads().items():
    for _, weights in _steps(weighting.get(NAME, gamma=10.0, rho=0.0), np.asarray(grads), 3):
      assert np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-4, name  # float32


def test_repeated_steps_reach_mgda_min_norm_weights():
  """On fixed gradients with ρ = 0 the λ iteration converges to MGDA's min-norm point; with
  ρ > 0 to the minimiser of ½|g_λ|² + (ρ/2)|λ|² (closed forms on a segment, T = 2)."""
  g1, g2 = np.array([1.0, 0.2, 0.0]), np.array([-0.6, 1.0, 0.3])
  jac = np.stack([g1, g2])
  g = jac @ jac.T
  for rho in (0.0, 0.5):
    q = g + rho * np.eye(2)  # minimise ½ λᵀ q λ over λ = (a, 1 − a)
    a = np.clip((q[1, 1] - q[0, 1]) / (q[0, 0] - 2 * q[0, 1] + q[1, 1]), 0, 1)
    method = weighting.get(NAME, gamma=1.0 / np.linalg.eigvalsh(q)[-1], rho=rho)
    step = jax.jit(lambda s, m=method: m.update(jnp.asarray(jac, jnp.float32), s,
                                                losses=jnp.ones(2), key=None)[1])
    state = method.init(2)
    for _ in range(200):
      state = step(state)
    np.testing.assert_allclose(state.weights, [a, 1 - a], atol=1e-4)


def test_gamma_zero_is_the_mean_gradient():
  jac = np.random.default_rng(2).normal(size=(4, 5))
  (combined, weights), = _steps(weighting.get(NAME, gamma=0.0), jac, calls=1)
  np.testing.assert_allclose(weights, 0.25)
  np.testing.assert_allclose(combined, jac.mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="gamma"):
    weighting.get(NAME, gamma=-1.0)
