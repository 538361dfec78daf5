"""MOML (Ye et al. 2021): the T exact hypergradients ∂F_i/∂α through the lookahead (closed form
on a linear model), and the update: MGDA on the l2-normalised rows, one Adam step on α."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.train import meta as meta_lib
from tests.weighting import linear_meta

NAME = "moml"


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_hypergradients_match_the_closed_form():
  p = linear_meta.problem(seed=3)
  method = weighting.get(NAME, inner_lr=0.2)
  logits = np.array([0.4, -0.3])
  state = method.init(2)._replace(logits=jnp.asarray(logits, jnp.float32))
  got = jax.jit(lambda s: meta_lib.meta_gradient(p.model, p.tasks, s, p.batch, p.meta_batch,
                                                 None, spec=method.meta))(
      linear_meta.state_of(p, state))
  s = _softmax(logits)
  d = linear_meta.d_meta_d_weights(p, linear_meta.theta(p), s, 0.2)  # ∂F_i/∂w_t, α = 0.2
  expected = d @ (np.diag(s) - np.outer(s, s))  # chain rule through the softmax
  assert got.shape == (2, 2)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-8)


def test_update_takes_an_adam_step_along_the_min_norm_combination():
  method = weighting.get(NAME, outer_lr=0.01)
  state = method.init(2)
  np.testing.assert_allclose(state.logits, 0.5)
  jac = np.array([[3.0, -1.0], [0.5, 2.0]])
  _, new, weights = jax.jit(method.update)(jnp.asarray(jac, jnp.float32), state,
                                           losses=jnp.ones(2), key=None)
  rows = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  a = np.clip((rows[1] @ rows[1] - rows[0] @ rows[1]) / np.sum((rows[0] - rows[1]) ** 2), 0, 1)
  direction = a * rows[0] + (1 - a) * rows[1]  # MGDA's min-norm point of the two rows
  logits = 0.5 - 0.01 * np.sign(direction)  # Adam's first step
  np.testing.assert_allclose(new.logits, logits, rtol=1e-5)
  np.testing.assert_allclose(weights, _softmax(logits), rtol=1e-5)
  _, same, weights = method.update(None, new, losses=jnp.ones(2), key=None)
  assert same is new
  with pytest.raises(ValueError, match="normalization"):
    weighting.get(NAME, normalization="loss")
