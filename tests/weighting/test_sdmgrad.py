"""SDMGrad (Xiao et al. 2023): d = (g_w + λ g0) / (1 + λ), w = argmin_{w ∈ Δ} |g_w + λ g0|²."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common

NAME = "sdmgrad"


def _raw(lamda):
  return W.get(NAME, lamda=lamda, max_norm=0.0)


def _qp_min(j, lamda):
  """float64: min over w ∈ Δ of ½|g_w + λ g0|², by enumerating the KKT systems of every support
  (the convex problem's minimiser solves the one of its support)."""
  t = j.shape[0]
  g = j @ j.T
  b = lamda * g @ np.full(t, 1 / t)
  f = lambda w: 0.5 * w @ g @ w + b @ w
  best = np.inf
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      kkt = np.zeros((r + 1, r + 1))
      kkt[:r, :r], kkt[:r, r], kkt[r, :r] = g[np.ix_(s, s)], -1.0, 1.0
      sol = np.linalg.lstsq(kkt, np.r_[-b[s], 1.0], rcond=None)[0]
      if np.all(sol[:r] >= -1e-12):
        w = np.zeros(t)
        w[s] = sol[:r]
        best = min(best, f(w))
  return best


def _cases(seed):
  rng = np.random.default_rng(seed)
  cases = [rng.normal(size=(t, 12)) for t in (2, 3, 4) for _ in range(2)]
  a = rng.normal(size=12)
  cases.append(np.stack([a, -0.8 * a + 0.3 * rng.normal(size=12), 5 * rng.normal(size=12)]))
  return cases


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME))


def test_lambda_zero_is_mgda():
  """λ = 0: d is the min-norm point of the convex hull (Sener & Koltun 2018), as `mgda`'s."""
  for j in _cases(0):
    d, _, w = common.run_once(_raw(0.0), jnp.asarray(j, jnp.float32))
    d_mgda, _, _ = common.run_once(W.get("mgda"), jnp.asarray(j, jnp.float32))
    tr = np.trace(j @ j.T)
    np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-6)
    np.testing.assert_allclose(d, d_mgda, atol=3e-3 * np.sqrt(tr))
    best = min(w_s @ (j[s] @ j[s].T) @ w_s for s, w_s in common.simplex_kkt_points(j @ j.T))
    np.testing.assert_allclose(np.sum(np.asarray(d, np.float64) ** 2), best, atol=4e-6 * tr)


def test_subproblem_optimum_and_neighbourhood():
  """w attains the float64 minimum of ½|g_w + λ g0|² over the simplex; the weights are
  (w + λ/T)/(1 + λ); |d - g0| = |g_w - g0| / (1 + λ) <= max_t |g_t - g0| / (1 + λ)."""
  for lamda in (0.3, 1.0, 5.0):
    for j in _cases(1):
      t = j.shape[0]
      _, _, weights = common.run_once(_raw(lamda), jnp.asarray(j, jnp.float32))
      weights = np.asarray(weights, np.float64)
      w = weights * (1 + lamda) - lamda / t
      assert np.all(w >= -1e-6) and abs(w.sum() - 1) < 1e-5
      g = j @ j.T
      value = 0.5 * w @ g @ w + lamda * w @ g @ np.full(t, 1 / t)
      np.testing.assert_allclose(value, _qp_min(j, lamda), atol=1e-5 * np.trace(g))
      d, g0 = weights @ j, j.mean(0)
      radius = np.max(np.linalg.norm(j - g0, axis=1)) / (1 + lamda)
      assert np.linalg.norm(d - g0) <= radius * (1 + 1e-5)


def test_large_lambda_is_mean_and_clip():
  rng = np.random.default_rng(2)
  j = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  d, _, _ = common.run_once(_raw(1e6), j)
  np.testing.assert_allclose(d, jnp.mean(j, 0), atol=1e-5)
  big = j * 10.0
  d_clip, _, _ = common.run_once(W.get(NAME), big)
  d_raw, _, _ = common.run_once(_raw(0.3), big)
  assert float(jnp.linalg.norm(d_raw)) > 1.0
  np.testing.assert_allclose(d_clip, d_raw / jnp.linalg.norm(d_raw), rtol=1e-5, atol=1e-7)


def test_adversarial_inputs_finite():
  base, cases = common.jacobian_cases(3)
  for j in cases.values():
    d, _, w = common.run_once(W.get(NAME), jnp.asarray(j))
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
  d, _, _ = common.run_once(_raw(0.3), jnp.asarray(np.stack([base[0], -base[0]])))
  np.testing.assert_allclose(d, 0.0, atol=1e-5)  # g and -g: g_w = g0 = 0
  d, _, _ = common.run_once(_raw(0.3), jnp.asarray(base[:1]))
  np.testing.assert_allclose(d, base[0], rtol=1e-6)


def test_lambda_must_be_non_negative():
  with pytest.raises(ValueError, match="lamda"):
    W.get(NAME, lamda=-1.0)


def test_jit_vmap_pytree_agree():
  common.check_batched_and_tree(W.get(NAME), 7, {"atol": 1e-5}, {"atol": 1e-4}, {"atol": 1e-4})
