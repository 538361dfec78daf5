"""GO4Align (Shen et al. 2024): risk-guided indicators γ, grouped by k-means."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from mtjax.weighting.loss_weighting import kmeans_1d
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "go4align"


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME, num_groups=2))


def _brute_kmeans(x, k):
  """float64: each value replaced by its group mean, for the best partition into k groups."""
  order = np.argsort(x)
  xs, best = x[order], None
  for cuts in itertools.combinations(range(1, len(x)), k - 1):
    bounds = [0, *cuts, len(x)]
    parts = [xs[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    cost = sum(((p - p.mean()) ** 2).sum() for p in parts)
    if best is None or cost < best[0]:
      best = (cost, np.concatenate([np.full(len(p), p.mean()) for p in parts]))
  out = np.empty_like(x)
  out[order] = best[1]
  return out


def test_kmeans_1d_is_the_exact_optimum():
  rng = np.random.default_rng(0)
  for t in (2, 4, 6, 8):
    for k in range(1, t + 1):
      x = rng.exponential(size=t)
      np.testing.assert_allclose(kmeans_1d(jnp.asarray(x, jnp.float32), k), _brute_kmeans(x, k),
                                 rtol=1e-5, err_msg=f"{t} {k}")
  x = jnp.array([1.0, 1.0, 5.0, 1.0])  # ties: one group is {5}
  np.testing.assert_allclose(kmeans_1d(x, 2), [1.0, 1.0, 5.0, 1.0])


def test_first_two_steps_by_hand():
  """p ∝ exp(-η Σ_past L), γ_t = (Σ_k L_k / L_t) p_t; one group: mean γ; T groups: γ;
  two groups: the k-means grouping."""
  eta = 0.1
  l1, l2 = np.array([1.0, 2.0, 4.0, 0.5]), np.array([0.8, 2.5, 3.0, 0.5])
  for k in (1, 2, 4):
    method = W.get(NAME, num_groups=k, robust_step_size=eta)
    state = method.init(4)
    p = np.full(4, 0.25)
    for losses in (l1, l2):
      _, state, w = method.update(None, state, losses=jnp.asarray(losses, jnp.float32), key=KEY)
      p = p * np.exp(-eta * losses)
      p = p / p.sum()
      gamma = losses.sum() / losses * p
      expected = {1: np.full(4, gamma.mean()), 2: _brute_kmeans(gamma, 2), 4: gamma}[k]
      np.testing.assert_allclose(w, expected, rtol=1e-5, err_msg=str(k))
      np.testing.assert_allclose(state.probs, p, rtol=1e-5)
  grads = jax.random.normal(KEY, (4, 3))
  combined, _, w = method.update(grads, state, losses=jnp.asarray(l2, jnp.float32), key=KEY)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)


def test_indicators_equalise_weighted_losses():
  """With uniform p (η = 0) and T groups, γ_t L_t = Σ_k L_k / T for every task."""
  method = W.get(NAME, num_groups=3, robust_step_size=0.0)
  losses = jnp.array([0.1, 1.0, 10.0])
  _, _, w = method.update(None, method.init(3), losses=losses, key=KEY)
  np.testing.assert_allclose(w * losses, jnp.sum(losses) / 3, rtol=1e-6)


def test_zero_losses_and_checks():
  method = W.get(NAME, num_groups=2)
  state = method.init(3)
  for losses in ([0.0, 1.0, 2.0], [0.0, 0.0, 0.0]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w))) and bool(jnp.all(jnp.isfinite(state.probs)))
  with pytest.raises(ValueError, match="num_groups"):
    W.get(NAME, num_groups=0)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(W.get(NAME))
