"""ExcessMTL (He et al. 2024): multiplicative weights on AdaGrad-preconditioned excess risks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common

NAME = "excess_mtl"


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME))


def _reference(grads, eta):
  """float64 Alg. 1: H_t = sqrt(Σ g_t² + 1e-7), e_t = Σ g_t² / H_t, λ ← λ exp(η e_t/e_t(0)),
  λ ← T λ / Σ λ from the second call on."""
  t = grads[0].shape[0]
  acc, lam, out = np.zeros_like(grads[0]), np.ones(t), []
  for k, g in enumerate(grads):
    acc = acc + g ** 2
    e = np.sum(g ** 2 / np.sqrt(acc + 1e-7), axis=1)
    if k == 0:
      e0 = e
    else:
      lam = lam * np.exp(eta * e / e0)
      lam = t * lam / lam.sum()
    out.append(lam.copy())
  return out


def test_first_steps_closed_form():
  eta = 0.5
  method = W.get(NAME, robust_step_size=eta)
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3, 8)) * np.array([[1.0], [0.5 ** k], [2.0]]) for k in range(4)]
  state = method.init(3, grads_like=jnp.zeros(8))
  update = jax.jit(method.update)
  for g, expected in zip(grads, _reference(grads, eta), strict=True):
    combined, state, w = update(jnp.asarray(g, jnp.float32), state, losses=jnp.ones(3), key=None)
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    np.testing.assert_allclose(combined, expected @ g, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.grad_sq_sum, sum(g ** 2 for g in grads), rtol=1e-5)
  assert int(state.step) == 4


def test_weight_moves_to_the_task_with_the_larger_excess_risk():
  """Task 1's gradient decays (its excess risk shrinks relative to the start), task 0's does
  not: task 0's weight grows, and the weights keep summing to T."""
  method = W.get(NAME, robust_step_size=1.0)
  rng = np.random.default_rng(1)
  state = method.init(2, grads_like=jnp.zeros(6))
  update = jax.jit(method.update)
  for k in range(10):
    g = rng.normal(size=(2, 6)) * np.array([[1.0], [0.7 ** k]])
    _, state, w = update(jnp.asarray(g, jnp.float32), state, losses=jnp.ones(2), key=None)
  assert float(w[0]) > 1.2 > 0.8 > float(w[1])
  np.testing.assert_allclose(jnp.sum(w), 2.0, rtol=1e-6)


def test_zero_first_gradient_and_init_needs_grads_like():
  method = W.get(NAME)
  state = method.init(2, grads_like=jnp.zeros(3))
  for g in ([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5]], [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]]):
    _, state, w = method.update(jnp.asarray(g), state, losses=jnp.ones(2), key=None)
    assert bool(jnp.all(jnp.isfinite(w)))
  assert float(w[0]) < float(w[1])  # e_0 / e_0(0) is taken as 0
  with pytest.raises(ValueError, match="grads_like"):
    method.init(2)
