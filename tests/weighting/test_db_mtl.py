"""DB-MTL, dual-balancing multi-task learning (Lin et al., 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "db_mtl"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def test_init_needs_grads_like():
  with pytest.raises(ValueError, match="grads_like"):
    weighting.get(NAME).init(3)


def test_contributions_reach_the_max_norm_after_the_ema_converges():
  k1, k2, k3 = jax.random.split(KEY, 3)
  grads = jnp.stack([0.1 * jax.random.normal(k1, (25,)), jax.random.normal(k2, (25,)),
                     10.0 * jax.random.normal(k3, (25,))])
  losses = jnp.array([0.5, 2.0, 1.0])
  method = weighting.get(NAME)
  state = method.init(3, grads_like=grads[0])
  update = jax.jit(method.update)
  for _ in range(80):  # 0.9**80 ≈ 2e-4
    combined, state, weights = update(grads, state, losses=losses, key=KEY)
  log_grads = grads / losses[:, None]  # ∇ log L_t = g_t / L_t
  np.testing.assert_allclose(state.grad_ema, log_grads, rtol=1e-3, atol=1e-6)
  norms = jnp.linalg.norm(log_grads, axis=1)
  unit = log_grads / norms[:, None]
  np.testing.assert_allclose(combined, jnp.max(norms) * unit.sum(0), rtol=1e-3, atol=1e-4)
  # Each task's contribution α_t m_t has norm max_k ||m_k||.
  ema_norms = jnp.linalg.norm(state.grad_ema, axis=1)
  contrib = (jnp.max(ema_norms) / (ema_norms + 1e-8))[:, None] * state.grad_ema
  np.testing.assert_allclose(jnp.linalg.norm(contrib, axis=1), jnp.max(norms), rtol=1e-3)
  assert bool(jnp.all(jnp.isnan(weights)))  # an EMA direction is not Σ w_t g_t


def test_beta_zero_is_an_exact_weighting_and_loss_scale_free():
  method = weighting.get(NAME, beta=0.0)
  grads = jax.random.normal(KEY, (3, 12))
  losses = jnp.array([0.3, 1.0, 3.0])
  state = method.init(3, grads_like=grads[0])
  combined, _, w = method.update(grads, state, losses=losses, key=KEY)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)
  log_grads = grads / (losses[:, None] + 1e-8)
  norms = jnp.linalg.norm(log_grads, axis=1)
  np.testing.assert_allclose(combined, (jnp.max(norms) * log_grads / norms[:, None]).sum(0),
                             rtol=1e-5, atol=1e-5)
  # Scaling task 1's loss by c scales its gradient by c: the log-gradient, so the
  # direction, is unchanged (the loss-scale balance).
  c = jnp.array([1.0, 50.0, 1.0])
  combined_c, _, _ = method.update(c[:, None] * grads, state, losses=c * losses, key=KEY)
  np.testing.assert_allclose(combined_c, combined, rtol=1e-4, atol=1e-5)


def test_ema_rate_schedule():
  beta, sigma = 0.8, 0.5
  method = weighting.get(NAME, beta=beta, beta_sigma=sigma)
  g1, g2 = jax.random.normal(KEY, (2, 2, 6))
  state = method.init(2, grads_like=g1[0])
  _, state, _ = method.update(g1, state, losses=jnp.ones(2), key=KEY)
  m1 = (1 - beta) * g1  # k = 1: β_1 = β, m starts at zero
  np.testing.assert_allclose(state.grad_ema, m1, rtol=1e-5, atol=1e-6)
  _, state, _ = method.update(g2, state, losses=jnp.ones(2), key=KEY)
  b2 = beta / 2 ** sigma
  np.testing.assert_allclose(state.grad_ema, b2 * m1 + (1 - b2) * g2, rtol=1e-5, atol=1e-6)
