"""IGBv1 (Dai et al. 2023), registered as igb_v1: Σ_t v_t log L_t with v = T softmax(L / L_base)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "igb_v1"


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME))


def _objective(losses, base):
  """Dai et al. (2023), IGBv1: Σ_t v_t log L_t, v = T softmax(L / L_base) held constant."""
  v = jax.lax.stop_gradient(losses.shape[0] * jax.nn.softmax(losses / base))
  return jnp.sum(v * jnp.log(losses))


def test_first_steps_by_hand():
  """Call 0: warm-up; calls 1-2 averaged into L_base (weights 1/L until then); call 3: the
  gradient of the IGBv1 objective, v_t / L_t."""
  method = W.get(NAME, warmup_steps=1, base_steps=2)
  history = jnp.array([[2.0, 1.0, 4.0], [1.0, 0.8, 3.0], [0.8, 0.6, 2.0], [0.6, 0.7, 1.0]])
  state = method.init(3)
  for k in range(3):
    _, state, w = method.update(None, state, losses=history[k], key=KEY)
    np.testing.assert_allclose(w, 1.0 / history[k], rtol=1e-6)
  base = jnp.array([0.9, 0.7, 2.5])
  np.testing.assert_allclose(state.reference, base, rtol=1e-6)
  grads = jax.random.normal(KEY, (3, 4))
  combined, _, w = method.update(grads, state, losses=history[3], key=KEY)
  ratio = np.array([0.6 / 0.9, 0.7 / 0.7, 1.0 / 2.5])
  v = 3 * np.exp(ratio) / np.exp(ratio).sum()
  np.testing.assert_allclose(w, v / np.array([0.6, 0.7, 1.0]), rtol=1e-5)
  np.testing.assert_allclose(w, jax.grad(_objective)(history[3], base), rtol=1e-5)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)


def test_larger_improvable_gap_gets_more_weight():
  """The task whose loss stays closer to its base (larger L / L_base: more left to improve) gets
  the larger v = L w; equal ratios give v = 1."""
  method = W.get(NAME)  # defaults: call 0 warm-up, call 1 is the base
  base = jnp.array([1.0, 2.0])
  _, state, _ = method.update(None, method.init(2), losses=base, key=KEY)
  _, state, _ = method.update(None, state, losses=base, key=KEY)
  _, _, w = method.update(None, state, losses=base * 0.5, key=KEY)
  np.testing.assert_allclose(w * base * 0.5, 1.0, rtol=1e-6)
  losses = jnp.array([0.9, 0.4])  # ratios 0.9 and 0.2
  _, _, w = method.update(None, state, losses=losses, key=KEY)
  v = w * losses
  assert float(v[0]) > 1.0 > float(v[1])
  np.testing.assert_allclose(jnp.sum(v), 2.0, rtol=1e-6)


def test_zero_losses_and_checks():
  method = W.get(NAME)
  state = method.init(2)
  for losses in ([0.0, 1.0], [0.0, 0.0], [1.0, 1e-20], [1.0, 2.0]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w))), losses
  with pytest.raises(ValueError, match="base_steps"):
    W.get(NAME, base_steps=0)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(W.get(NAME))
