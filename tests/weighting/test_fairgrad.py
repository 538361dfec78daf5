"""FairGrad (Ban & Ji 2024): G w = w^{-1/α} (Eq. 8); α = 1 is Nash-MTL's condition, α → ∞ equal
progress <g_t, d>."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from mtjax.weighting.multi_objective import fairgrad_weights
from tests.weighting import common

NAME = "fairgrad"


def _noclip(alpha):
  return W.get(NAME, alpha=alpha, max_norm=0.0)


def _reference(g, alpha, ridge=1e-6):
  """float64 Newton (log-space, backtracking) on (G + ridge tr(G)/T I) w = w^{-1/α}."""
  t = g.shape[0]
  gr = g + ridge * np.trace(g) / t * np.eye(t)
  v = np.zeros(t)
  merit = lambda v: np.sum((gr @ np.exp(v) - np.exp(-v / alpha)) ** 2)
  for _ in range(300):
    w = np.exp(v)
    f = gr @ w - w ** (-1 / alpha)
    jac = gr * w[None] + np.diag(w ** (-1 / alpha) / alpha)
    d = np.linalg.solve(jac, f)
    step = 1.0
    while merit(v - step * d) > merit(v) and step > 1e-10:
      step /= 2
    v = v - step * d
  return np.exp(v)


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME))


def test_weights_match_float64_solution():
  """The on-device solve agrees with float64 Newton on the raw (ridged) system."""
  rng = np.random.default_rng(0)
  solve = jax.jit(fairgrad_weights, static_argnums=(1,))
  for alpha in (0.5, 1.0, 2.0, 10.0):
    for t in (2, 3, 5, 10):
      j = rng.normal(size=(t, 30)) * rng.uniform(0.1, 10.0, (t, 1))
      g = j @ j.T
      w = np.asarray(solve(jnp.asarray(g, jnp.float32), alpha), np.float64)
      np.testing.assert_allclose(w, _reference(g, alpha), rtol=1e-5, err_msg=f"{alpha} {t}")


def test_alpha_one_is_proportional_fairness():
  """α = 1: w ⊙ (G w) = 1 (Navon et al. 2022, Eq. 4), so the direction is Nash-MTL's."""
  rng = np.random.default_rng(1)
  nash = W.get("nash_mtl", max_norm=0.0)
  for t in (2, 3, 5):
    j = rng.normal(size=(t, 20)) * rng.uniform(0.2, 5.0, (t, 1))
    d, _, w = common.run_once(_noclip(1.0), jnp.asarray(j, jnp.float32))
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(w * (j @ j.T @ w), 1.0, rtol=1e-4)
    d_nash, _, w_nash = common.run_once(nash, jnp.asarray(j, jnp.float32))
    ratio = w / np.asarray(w_nash)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # same direction, other scale
    np.testing.assert_allclose(d, w @ j, rtol=1e-5, atol=1e-6)


def test_orthogonal_closed_form_and_max_min_limit():
  """Orthogonal g_t with norms n_t: w_t = n_t^{-2α/(α+1)} and <g_t, d> = n_t^{2/(α+1)}, which
  tends to equal progress (max-min fairness) as α grows (with the solver's ridge r tr(G)/T
  added to n_t², as solved)."""
  q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 4)))
  norms = np.array([0.3, 1.0, 4.0, 10.0])
  j = (q.T * norms[:, None]).astype(np.float32)
  ridged = norms ** 2 + 1e-6 * np.mean(norms ** 2)
  spreads = []
  for alpha in (0.5, 1.0, 2.0, 10.0, 100.0):
    d, _, w = common.run_once(_noclip(alpha), jnp.asarray(j))
    np.testing.assert_allclose(w, ridged ** (-alpha / (alpha + 1)), rtol=2e-5)
    progress = j.astype(np.float64) @ np.asarray(d, np.float64)
    np.testing.assert_allclose(progress, norms ** (2 / (alpha + 1)), rtol=5e-4)
    spreads.append(progress.max() / progress.min())
  assert all(a > b for a, b in zip(spreads, spreads[1:], strict=False))
  assert spreads[-1] < 1.1


def test_large_alpha_equalises_progress():
  """Correlated gradients g_t = s_t (q_t + √c u) (G = D(I + c11ᵀ)D, whose equal-progress point
  G⁻¹1 is positive): the spread of <g_t, d> = w_t^{-1/α} shrinks as α grows, to within 1% at
  α = 1000, and is large under proportional fairness (α = 1)."""
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(20, 4)))
  rows = q.T[:3] + np.sqrt(0.2) * q.T[3]
  j = rows * np.array([[1.0], [2.0], [4.0]])
  assert np.all(np.linalg.solve(j @ j.T, np.ones(3)) > 0)
  spreads = []
  for alpha in (20.0, 200.0, 1000.0):
    d, _, _ = common.run_once(_noclip(alpha), jnp.asarray(j, jnp.float32))
    progress = j @ np.asarray(d, np.float64)
    spreads.append(progress.max() / progress.min())
  assert spreads[0] > spreads[1] > spreads[2] and spreads[2] < 1.01
  d, _, _ = common.run_once(_noclip(1.0), jnp.asarray(j, jnp.float32))
  progress = j @ np.asarray(d, np.float64)
  assert progress.max() / progress.min() > 1.2  # not so under proportional fairness


def test_clip_and_scale():
  """max_norm clips |d| to 1 without turning it; the unclipped weights follow the exact scaling
  w(kG) = k^{-α/(α+1)} w(G)."""
  rng = np.random.default_rng(4)
  j = jnp.asarray(rng.normal(size=(3, 20)) * 0.5, jnp.float32)
  d, _, _ = common.run_once(W.get(NAME), j)
  d_raw, _, w_raw = common.run_once(_noclip(2.0), j)
  assert float(jnp.linalg.norm(d_raw)) > 1.0
  np.testing.assert_allclose(float(jnp.linalg.norm(d)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(d, d_raw / jnp.linalg.norm(d_raw), rtol=1e-5, atol=1e-7)
  _, _, w_scaled = common.run_once(_noclip(2.0), j * 10.0)  # G scaled by 100
  np.testing.assert_allclose(w_scaled, w_raw * 100.0 ** (-2 / 3), rtol=1e-4)


def test_adversarial_inputs_finite():
  base, cases = common.jacobian_cases(5)
  for method in (W.get(NAME), _noclip(1.0), _noclip(20.0)):
    for name, j in cases.items():
      d, _, w = common.run_once(method, jnp.asarray(j))
      assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)) and np.all(np.asarray(w) > 0), name
  d, _, w = common.run_once(_noclip(2.0), jnp.asarray(base[:1]))  # T = 1: w = |g|^{-4/3}
  np.testing.assert_allclose(w, np.linalg.norm(base[0]) ** (-4 / 3), rtol=1e-5)


def test_alpha_must_be_positive():
  with pytest.raises(ValueError, match="alpha"):
    W.get(NAME, alpha=0.0)


def test_jit_vmap_pytree_agree():
  common.check_batched_and_tree(W.get(NAME), 6, {"rtol": 1e-4}, {"rtol": 1e-4}, {"atol": 1e-5})
