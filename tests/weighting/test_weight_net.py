"""weight_net: λ = net_φ(loss statistics), φ learned by the exact meta-gradient of the
validation loss through a lookahead step (closed form on a linear model), and its update."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting
from mtjax.train import meta as meta_lib
from tests.weighting import linear_meta

NAME = "weight_net"


def _net64(params, features):
  """float64 numpy copy of ``weight_net_apply``."""
  hidden = np.tanh(features @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  e = np.exp(logits - logits.max())
  return features.shape[0] * e / e.sum()


def _features64(losses, first, average):
  log = np.log(losses)
  return np.stack([log, log - np.log(first), log - np.log(average)], axis=-1)


def _state(method, rng):
  """A state with a non-trivial network and loss history (one step seen)."""
  state = method.init(2)
  params = {k: jnp.asarray(rng.normal(size=np.shape(v)), jnp.float32)
            for k, v in state.params.items()}
  return state._replace(params=params, first=jnp.array([2.0, 0.5]),
                        average=jnp.array([1.5, 0.8]), seen=jnp.int32(1))


def test_meta_gradient_matches_the_closed_form():
  p = linear_meta.problem()
  method = weighting.get(NAME, hidden=4)
  state = _state(method, np.random.default_rng(1))
  alpha = 0.3
  got = jax.jit(lambda s: meta_lib.meta_gradient(p.model, p.tasks, s, p.batch, p.meta_batch,
                                                 alpha, spec=method.meta))(
      linear_meta.state_of(p, state))

  theta = linear_meta.theta(p)
  feats = _features64(linear_meta.losses(p.batch, theta), np.array([2.0, 0.5]),
                      np.array([1.5, 0.8]))
  phi = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  lam = _net64(phi, feats)
  d_lam = linear_meta.d_meta_d_weights(p, theta, lam, alpha).sum(0)  # both tasks primary
  for name, value in phi.items():  # ∂λ/∂φ by float64 central differences, then the chain rule
    expected = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
      hi, lo = ({**phi, name: value.copy()} for _ in range(2))
      hi[name][idx] += 1e-6
      lo[name][idx] -= 1e-6
      expected[idx] = d_lam @ (_net64(hi, feats) - _net64(lo, feats)) / 2e-6
    np.testing.assert_allclose(got[name], expected, rtol=2e-3, atol=1e-6, err_msg=name)
  assert np.abs(np.asarray(got["w1"])).max() > 0  # the gradient reaches the first layer


def test_update_is_an_adam_step_then_the_statistics_take_the_losses():
  method = weighting.get(NAME, hidden=4, meta_lr=0.01, average_decay=0.5)
  state = method.init(2)
  losses = jnp.array([2.0, 0.5])
  _, same, weights = method.update(None, state, losses=losses, key=None)
  assert same is state
  np.testing.assert_allclose(weights, [1.0, 1.0], rtol=1e-6)  # zero output layer: equal

  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), state.params)
  _, new, weights = jax.jit(method.update)(grads, state, losses=losses, key=None)
  for name, value in new.params.items():  # Adam's first step: φ − lr · sign(g)
    np.testing.assert_allclose(value, np.asarray(state.params[name]) - 0.01, rtol=1e-5,
                               atol=1e-6)
  phi = {k: np.asarray(v, np.float64) for k, v in new.params.items()}
  feats = _features64(np.array([2.0, 0.5]), np.array([2.0, 0.5]), np.array([2.0, 0.5]))
  np.testing.assert_allclose(weights, _net64(phi, feats), rtol=1e-5)
  np.testing.assert_allclose(new.first, [2.0, 0.5])
  np.testing.assert_allclose(new.average, [2.0, 0.5])

  _, newer, weights = method.update(grads, new, losses=jnp.array([1.0, 1.0]), key=None)
  np.testing.assert_allclose(newer.first, [2.0, 0.5])
  np.testing.assert_allclose(newer.average, [1.5, 0.75])
  assert int(newer.seen) == 2 and int(newer.count) == 2
  phi = {k: np.asarray(v, np.float64) for k, v in newer.params.items()}
  feats = _features64(np.array([1.0, 1.0]), np.array([2.0, 0.5]), np.array([2.0, 0.5]))
  np.testing.assert_allclose(weights, _net64(phi, feats), rtol=1e-5)
  assert abs(float(weights.sum()) - 2.0) < 1e-5
