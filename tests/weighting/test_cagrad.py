"""CAGrad (Liu et al. 2021): d = g0 + c|g0| g_w/|g_w| maximises min_t <g_t, d> in the ball."""

import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

import mtjax.weighting as W
from tests.weighting import common

RAW = W.get("cagrad", rescale=0)
METHODS = {"default": W.get("cagrad"), "raw": RAW, "c0": W.get("cagrad", c=0.0)}


def _run(name, grads):
  return common.run_once(METHODS[name], grads)


def _conflicting(rng, t=3, d=12):
  j = rng.normal(size=(t, d))
  j[1] = -0.8 * j[0] + 0.3 * rng.normal(size=d)
  return j


def test_c0_is_exact_mean_and_rescale():
  rng = np.random.default_rng(0)
  j = jnp.asarray(_conflicting(rng), jnp.float32)
  d, _, w = _run("c0", j)
  np.testing.assert_array_equal(w, np.full(3, 1 / 3, np.float32))
  np.testing.assert_allclose(d, jnp.mean(j, 0), atol=1e-6)
  d_raw, _, _ = _run("raw", j)
  d_def, _, _ = _run("default", j)
  np.testing.assert_allclose(d_def, d_raw / (1 + 0.4 ** 2), rtol=1e-5, atol=1e-6)


def test_constraint_and_worst_case_improvement():
  """|d - g0| = c|g0| (the ball's boundary, Eq. 5), min_t <g_t, d> >= that of the mean, and equal
  to the optimum of the dual min_w g_w·g0 + c|g0||g_w| (SLSQP in float64)."""
  rng = np.random.default_rng(1)
  for _ in range(4):
    j = _conflicting(rng)
    d, _, _ = _run("raw", jnp.asarray(j, jnp.float32))
    d = np.asarray(d, np.float64)
    g0 = j.mean(0)
    c = 0.4 * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= c * (1 + 1e-4)
    assert np.min(j @ d) >= np.min(j @ g0) - 1e-5
    g = j @ j.T
    f = lambda x, g=g, g0=g0, c=c, j=j: x @ (j @ g0) + c * np.sqrt(max(x @ g @ x, 0))
    best = min(minimize(f, x0, bounds=[(0, 1)] * 3, method="SLSQP",
                        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()}).fun
               for x0 in np.eye(3) * 0.8 + 0.2 / 3)
    np.testing.assert_allclose(np.min(j @ d), best, atol=1e-4 * np.trace(g))


def test_adversarial_inputs_finite():
  base, cases = common.jacobian_cases(2)
  for j in cases.values():
    d, _, w = _run("default", jnp.asarray(j))
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
  d, _, w = _run("raw", jnp.asarray(base[:1]))
  np.testing.assert_allclose(d, base[0] * 1.4, rtol=1e-5)  # T=1: g0 + c g0
  d, _, _ = _run("raw", jnp.asarray(np.stack([base[0]] * 3)))
  np.testing.assert_allclose(d, base[0] * 1.4, rtol=1e-4)


def test_jit_vmap_pytree_agree():
  # The Gram matrix summed leaf by leaf rounds differently; the dual solve is float32.
  common.check_batched_and_tree(METHODS["default"], 3, {"atol": 1e-5}, {"atol": 2e-4},
                                {"atol": 2e-4})
