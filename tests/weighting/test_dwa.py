"""Dynamic weight average (Liu, Johns & Davison, 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "dwa"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def _dwa_closed_form(older, newer, temperature=2.0):
  r = np.asarray(newer, np.float64) / np.asarray(older, np.float64)
  e = np.exp(r / temperature)
  return len(r) * e / e.sum()


def test_equal_weights_then_closed_form_on_a_two_step_history():
  method = weighting.get(NAME)
  state = method.init(3)
  l1, l2, l3 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.9, 3.3]), jnp.array([0.4, 1.5, 3.0])
  _, state, w1 = method.update(None, state, losses=l1, key=KEY)
  _, state, w2 = method.update(None, state, losses=l2, key=KEY)
  np.testing.assert_array_equal(w1, jnp.ones(3))
  np.testing.assert_array_equal(w2, jnp.ones(3))
  grads = jax.random.normal(KEY, (3, 8))
  combined, state, w3 = method.update(grads, state, losses=l3, key=KEY)
  np.testing.assert_allclose(w3, _dwa_closed_form(l1, l2), rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(w3), 3.0, rtol=1e-6)
  np.testing.assert_allclose(combined, w3 @ grads, rtol=1e-5, atol=1e-6)
  # The task whose loss fell least (task 2 rose) gets the largest weight.
  assert int(jnp.argmax(w3)) == 2
  _, _, w4 = method.update(None, state, losses=l3, key=KEY)
  np.testing.assert_allclose(w4, _dwa_closed_form(l2, l3), rtol=1e-5)


def test_temperature_and_period():
  method = weighting.get(NAME, temperature=0.5, period=2)
  state = method.init(2)
  seq = [jnp.array(v) for v in ([1.0, 1.0], [3.0, 1.0], [1.0, 0.2], [1.0, 0.2], [5.0, 5.0])]
  ws = []
  for losses in seq:
    _, state, w = method.update(None, state, losses=losses, key=KEY)
    ws.append(w)
  for w in ws[:4]:  # two full periods are needed before the first ratio
    np.testing.assert_array_equal(w, jnp.ones(2))
  older, newer = (seq[0] + seq[1]) / 2, (seq[2] + seq[3]) / 2
  np.testing.assert_allclose(ws[4], _dwa_closed_form(older, newer, 0.5), rtol=1e-5)


def test_bad_period_raises():
  with pytest.raises(ValueError, match="period"):
    weighting.get(NAME, period=0)


def test_zero_previous_loss_stays_finite():
  method = weighting.get(NAME)
  state = method.init(2)
  for losses in ([0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w)))
    np.testing.assert_allclose(jnp.sum(w), 2.0, rtol=1e-6)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(weighting.get(NAME))
