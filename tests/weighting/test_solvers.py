"""Solvers against exact float64 solutions (active-set enumeration, closed forms for T = 2)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.weighting import solvers
from tests.weighting import common


def _exact_simplex_min_norm(g):
  """min_{w ∈ Δ} wᵀ g w by enumerating supports (float64); returns the minimum value."""
  t, best = g.shape[0], np.inf
  for s, w_s in common.simplex_kkt_points(g):
    w = np.zeros(t)
    w[s] = w_s
    best = min(best, w @ g @ w)
  return best


def _exact_box_qp(q, lower):
  """argmin_{x >= lower} ½ xᵀ q x (q positive definite) by enumerating free sets (float64)."""
  t, best, arg = q.shape[0], np.inf, None
  for r in range(t + 1):
    for free in itertools.combinations(range(t), r):
      free = list(free)
      fixed = [j for j in range(t) if j not in free]
      x = lower.copy()
      if free:
        x[free] = np.linalg.solve(q[np.ix_(free, free)], -q[np.ix_(free, fixed)] @ lower[fixed])
      if np.all(x >= lower - 1e-12) and 0.5 * x @ q @ x < best:
        best, arg = 0.5 * x @ q @ x, x
  return arg, best


def _jacobians(rng, t):
  """Random and adversarial (T, D) Jacobians."""
  j = rng.normal(size=(t, 30))
  scaled = j.copy()
  scaled[0] *= 100.0
  identical = j.copy()
  identical[1] = identical[0]
  zero = j.copy()
  zero[-1] = 0.0
  opposite = j.copy()
  opposite[1] = -opposite[0] + 1e-3 * rng.normal(size=30)
  ill = rng.normal(size=(1, 30)) * rng.uniform(0.5, 2.0, (t, 1)) + 1e-3 * rng.normal(size=(t, 30))
  low_rank = rng.normal(size=(t, 2))  # 0 is often inside the hull: singular, degenerate
  return {"random": j, "scaled": scaled, "identical": identical, "zero": zero,
          "opposite": opposite, "ill": ill, "low_rank": low_rank}


def test_project_simplex_matches_exact_projection():
  rng = np.random.default_rng(0)
  proj = jax.jit(solvers.project_simplex)
  for t in (1, 2, 3, 7):
    for _ in range(10):
      y = rng.normal(size=t) * 3
      w = np.asarray(proj(jnp.asarray(y, jnp.float32)))
      assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
      # Optimality (variational inequality): (y - w)·(z - w) <= 0 at every vertex z.
      assert np.all((y - w) @ (np.eye(t) - w).T <= 1e-5)


def test_min_norm_2_closed_form():
  rng = np.random.default_rng(1)
  for _ in range(20):
    x1, x2 = rng.normal(size=5), rng.normal(size=5)
    gamma, cost = solvers.min_norm_2(x1 @ x1, x1 @ x2, x2 @ x2)
    grid = np.linspace(0, 1, 100001)
    costs = np.sum((grid[:, None] * x1 + (1 - grid[:, None]) * x2) ** 2, axis=1)
    assert float(cost) <= costs.min() + 1e-5 * (x1 @ x1 + x2 @ x2)
    np.testing.assert_allclose(float(gamma), grid[costs.argmin()], atol=1e-4)
  gamma, cost = solvers.min_norm_2(jnp.float32(2.0), jnp.float32(2.0), jnp.float32(2.0))
  assert float(gamma) == 0.5 and float(cost) == pytest.approx(2.0)


@pytest.mark.parametrize("t", [2, 3, 5])
def test_min_norm_weights_matches_exact(t):
  """Objective within 2e-6 of the exact minimum for G scaled to unit trace; weights on Δ."""
  rng = np.random.default_rng(t)
  solve = jax.jit(solvers.min_norm_weights)
  for _ in range(2):
    for name, j in _jacobians(rng, t).items():
      g = j @ j.T
      w = np.asarray(solve(jnp.asarray(g, jnp.float32)), np.float64)
      assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5, name
      gn = g / np.trace(g)
      assert w @ gn @ w <= _exact_simplex_min_norm(gn) + 2e-6, name


def test_min_norm_weights_zero_and_one():
  solve = jax.jit(solvers.min_norm_weights)
  assert np.all(np.isfinite(solve(jnp.zeros((3, 3)))))
  np.testing.assert_array_equal(solve(jnp.ones((1, 1))), [1.0])


def test_simplex_qp_with_linear_term():
  rng = np.random.default_rng(3)
  solve = jax.jit(solvers.simplex_qp)
  for _ in range(5):
    j = rng.normal(size=(4, 6))
    q, b = j @ j.T, rng.normal(size=4)
    w = np.asarray(solve(jnp.asarray(q, jnp.float32), jnp.asarray(b, jnp.float32)))
    # Dense reference: projected gradient in float64, many iterations.
    v = np.full(4, 0.25)
    for _ in range(5000):
      v = common.project_simplex(v - (q @ v + b) / np.trace(q))
    assert 0.5 * w @ q @ w + b @ w <= 0.5 * v @ q @ v + b @ v + 1e-5 * np.trace(q)


@pytest.mark.parametrize("t", [2, 3, 5])
def test_box_qp_matches_exact(t):
  """UPGrad's problem min_{v >= u} vᵀ q v, q = G/tr(G) + 1e-4 I (κ up to 1e4): objective within
  1e-4 relative, point within 1e-2 relative of the exact minimiser (float32, 100 iterations)."""
  rng = np.random.default_rng(10 + t)
  solve = jax.jit(solvers.box_qp)
  for name, j in _jacobians(rng, t).items():
    g = j @ j.T
    q = g / np.trace(g) + 1e-4 * np.eye(t)
    for i in range(t):
      lower = np.zeros(t)
      lower[i] = 1.0 / t
      x = np.asarray(solve(jnp.asarray(q, jnp.float32), jnp.zeros(t), jnp.asarray(lower)),
                     np.float64)
      x_star, f_star = _exact_box_qp(q, lower)
      assert np.all(x >= lower - 1e-7), name
      assert 0.5 * x @ q @ x <= f_star * (1 + 1e-4) + 1e-9, name
      np.testing.assert_allclose(x, x_star, rtol=0, atol=1e-2 * np.abs(x_star).max(), err_msg=name)


def test_solvers_vmap_agrees():
  rng = np.random.default_rng(4)
  js = rng.normal(size=(3, 4, 10))
  gs = jnp.asarray(np.einsum("bid,bjd->bij", js, js), jnp.float32)
  batched = jax.jit(jax.vmap(solvers.min_norm_weights))(gs)
  single = jax.jit(solvers.min_norm_weights)
  for k in range(3):
    np.testing.assert_allclose(batched[k], single(gs[k]), atol=1e-6)
