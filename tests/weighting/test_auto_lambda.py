"""Auto-Lambda: the exact meta-gradient (closed form on a linear model) and the λ update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.train import meta as meta_lib
from tests.weighting import linear_meta


def test_meta_gradient_matches_the_closed_form():
  p = linear_meta.problem()
  method = weighting.get("auto_lambda", weight_init=0.7, primary_tasks=(1,))
  state = linear_meta.state_of(p, method.init(2))
  alpha = 0.3
  got = meta_lib.meta_gradient(p.model, p.tasks, state, p.batch, p.meta_batch, alpha)

  # ∂/∂λ_t of the primary (task b) meta loss at θ' = θ − α Σ λ_t ∇L_t
  expected = linear_meta.d_meta_d_weights(p, linear_meta.theta(p), [0.7, 0.7], alpha)[1]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-7)
  assert got[0] == 0.0  # task a cannot change the primary task's loss through θ[:, 1]


def test_update_takes_an_adam_step_against_the_meta_gradient():
  method = weighting.get("auto_lambda")
  state = method.init(3)
  np.testing.assert_allclose(state.weights, 0.1)
  combined, same, weights = method.update(None, state, losses=jnp.ones(3), key=None)
  assert combined is None and same is state
  _, new, weights = method.update(jnp.array([1.0, -2.0, 0.0]), state, losses=None, key=None)
  np.testing.assert_allclose(weights, [0.1 - 1e-4, 0.1 + 1e-4, 0.1], rtol=1e-5)
  assert int(new.count) == 1
  assert jnp.all(jnp.isfinite(jax.jit(method.update)(jnp.zeros(3), state, losses=None,
                                                     key=None)[2]))


def test_primary_tasks_are_checked():
  np.testing.assert_array_equal(weighting.get("auto_lambda", primary_tasks=(0, 2)).init(3).primary,
                                [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match="primary_tasks"):
    weighting.get("auto_lambda", primary_tasks=(3,)).init(3)
