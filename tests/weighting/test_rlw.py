"""Random loss weighting (Lin et al., 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "rlw"


# --- the contract, shared with the other weighting tests (common.py) ---

@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(weighting.get(NAME))


# --- method-specific properties ---

def test_weights_are_a_softmax_of_the_key_only():
  method = weighting.get(NAME)
  state = method.init(4)
  key = jax.random.PRNGKey(7)
  _, _, w1 = method.update(None, state, losses=jnp.ones(4), key=key)
  _, _, w2 = method.update(None, state, losses=jnp.array([9.0, 0.1, 3.0, 0.0]), key=key)
  _, _, w3 = method.update(None, state, losses=jnp.ones(4), key=jax.random.PRNGKey(8))
  assert bool(jnp.all(w1 > 0))
  np.testing.assert_allclose(jnp.sum(w1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(w1, w2)  # the losses do not matter
  assert not np.allclose(w1, w3)         # the key does
  # A softmax: log-weights differ from the N(0, 1) draw by one constant.
  logits = jnp.log(w1)
  centred = logits - jnp.mean(logits)
  draw = jax.random.normal(key, (4,))
  np.testing.assert_allclose(centred, draw - jnp.mean(draw), rtol=1e-5, atol=1e-5)


def test_distribution_is_symmetric_across_keys():
  method = weighting.get(NAME)
  keys = jax.random.split(jax.random.PRNGKey(3), 4000)
  ws = jax.vmap(lambda k: method.update(None, method.init(3), losses=jnp.ones(3), key=k)[2])(keys)
  np.testing.assert_allclose(jnp.mean(ws, axis=0), jnp.full(3, 1 / 3), atol=0.01)
  assert float(jnp.std(ws[:, 0])) > 0.05  # genuinely random


def test_missing_key_raises():
  method = weighting.get(NAME)
  with pytest.raises(ValueError, match="key"):
    method.update(None, method.init(2), losses=jnp.ones(2), key=None)


def test_combined_is_the_weighted_sum():
  method = weighting.get(NAME)
  grads = jax.random.normal(KEY, (3, 6))
  combined, _, w = method.update(grads, method.init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(weighting.get(NAME))
