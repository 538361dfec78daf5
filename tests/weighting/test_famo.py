"""FAMO, fast adaptive multitask optimization (Liu et al., 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "famo"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def _famo_objective(losses, z, min_losses):
  """Liu et al. (2023): Σ_t z_t log(L_t - L*_t + ε) / c, c = Σ_t z_t / (L_t - L*_t + ε) fixed."""
  gap = losses - min_losses + 1e-8
  c = jax.lax.stop_gradient(jnp.sum(z / gap))
  return jnp.sum(z * jnp.log(gap)) / c


def test_weights_are_the_gradient_of_the_famo_objective():
  method = weighting.get(NAME)
  state = method.init(3)._replace(logits=jnp.array([0.3, -0.2, 0.1]),
                                  min_losses=jnp.array([0.0, 0.1, 0.2]))
  losses = jnp.array([0.5, 1.0, 2.0])
  grads = jax.random.normal(KEY, (3, 7))
  combined, new_state, weights = method.update(grads, state, losses=losses, key=KEY)
  # First call: no previous losses, so the logits take no step.
  np.testing.assert_array_equal(new_state.logits, state.logits)
  z = jax.nn.softmax(state.logits)
  expected = jax.grad(_famo_objective)(losses, z, state.min_losses)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-6)
  np.testing.assert_allclose(combined, weights @ grads, rtol=1e-5, atol=1e-6)


def test_constant_losses_keep_equal_logits():
  method = weighting.get(NAME)
  state = method.init(3)
  losses = jnp.array([0.2, 1.0, 5.0])
  for _ in range(10):
    _, state, weights = method.update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(state.logits, 0.0, atol=1e-7)
  # Equal z: the effective weights are those of Σ_t log L_t / T, i.e. ∝ 1 / L_t.
  np.testing.assert_allclose(weights, (1 / losses) / jnp.sum(1 / losses), rtol=1e-5)
  state = method.init(3)
  for _ in range(5):
    _, state, equal = method.update(None, state, losses=jnp.full(3, 0.7), key=KEY)
  np.testing.assert_allclose(equal, jnp.full(3, 1 / 3), rtol=1e-6)


def test_second_call_takes_one_adam_step():
  lr = 0.05
  method = weighting.get(NAME, w_lr=lr)
  state = method.init(3)
  _, state, _ = method.update(None, state, losses=jnp.array([1.0, 1.0, 1.0]), key=KEY)
  _, state, _ = method.update(None, state, losses=jnp.array([0.5, 0.9, 2.0]), key=KEY)
  # δ = log(prev) - log(curr); ∇_logits = J_softmax^T δ; Adam's first step is -lr·sign(∇)
  # (up to ε = 1e-8 against |∇|, which is not small here).
  delta = -jnp.log(jnp.array([0.5, 0.9, 2.0]))
  grad = jax.vjp(jax.nn.softmax, jnp.zeros(3))[1](delta)[0]
  np.testing.assert_allclose(state.logits, -lr * jnp.sign(grad), rtol=1e-4, atol=1e-6)
  assert int(state.count) == 1


def test_weight_moves_to_the_task_whose_loss_falls_slower():
  method = weighting.get(NAME)
  state = method.init(2)
  update = jax.jit(method.update)
  for k in range(30):
    losses = jnp.array([0.9 ** k, 0.99 ** k])  # task 0 fast, task 1 slow
    _, state, _ = update(None, state, losses=losses, key=KEY)
  z = jax.nn.softmax(state.logits)
  assert float(z[1]) > 0.6 > 0.4 > float(z[0])


def test_zero_loss_stays_finite():
  method = weighting.get(NAME)
  state = method.init(2)
  for losses in ([1.0, 0.0], [0.0, 0.0], [1.0, 1e-20]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w))), losses
    assert bool(jnp.all(jnp.isfinite(state.logits))), losses


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(weighting.get(NAME))
