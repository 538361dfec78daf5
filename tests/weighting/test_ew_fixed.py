"""Equal and fixed weighting: plain (weighted) sums of the task gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

KEY = jax.random.PRNGKey(0)


# --- method-specific properties ---

def test_ew_is_the_plain_sum():
  grads = jax.random.normal(KEY, (3, 11))
  combined, _, weights = weighting.get("ew").update(grads, weighting.get("ew").init(3),
                                                    losses=jnp.array([1.0, 5.0, 0.1]), key=KEY)
  np.testing.assert_allclose(combined, grads.sum(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(weights, jnp.ones(3))


def test_fixed_applies_its_weights():
  grads = jax.random.normal(KEY, (3, 11))
  lam = [0.5, 2.0, -1.0]
  method = weighting.get("fixed", weights=lam)
  combined, _, weights = method.update(grads, method.init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(combined, jnp.asarray(lam) @ grads, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(weights, jnp.asarray(lam, jnp.float32))
  # Default: all ones.
  method = weighting.get("fixed")
  combined, _, weights = method.update(grads, method.init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(combined, grads.sum(0), rtol=1e-6, atol=1e-6)


def test_fixed_wrong_weight_count_raises():
  with pytest.raises(ValueError, match="weights"):
    weighting.get("fixed", weights=[1.0, 2.0]).init(3)


@pytest.mark.parametrize("name", ["ew", "fixed"])
def test_loss_level_without_grads_returns_none(name):
  common.check_without_grads_returns_none(weighting.get(name))


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
@pytest.mark.parametrize("name", ["ew", "fixed"])
def test_contract_ew_fixed(name, check):
  check(weighting.get(name))
