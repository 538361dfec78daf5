"""MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common

MGDA = {n: W.get("mgda", normalization=n) for n in ("none", "l2", "loss", "loss+")}

KEY = jax.random.PRNGKey(0)


def _run(method, grads, losses=None):
  return common.run_once(method, grads, losses=losses)


def _exact_min_norm(j):
  """Brute force over supports in float64: the min-norm point of conv(rows of j)."""
  best, best_d = np.inf, None
  for s, w in common.simplex_kkt_points(j @ j.T):
    d = w @ j[s]
    if d @ d < best:
      best, best_d = d @ d, d
  return best_d


def test_two_tasks_closed_form():
  rng = np.random.default_rng(0)
  for _ in range(5):
    j = rng.normal(size=(2, 20))
    d, _, w = _run(MGDA["none"], jnp.asarray(j, jnp.float32))
    gamma = np.clip((j[1] - j[0]) @ j[1] / np.sum((j[0] - j[1]) ** 2), 0, 1)
    np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-5)
    np.testing.assert_allclose(d, gamma * j[0] + (1 - gamma) * j[1], atol=1e-5)


@pytest.mark.parametrize("t", [3, 4, 5])
def test_min_norm_point_and_descent(t):
  """Matches the brute-force min-norm point; when 0 is not in the hull, <g_t, d> >= |d|² > 0."""
  rng = np.random.default_rng(t)
  for _ in range(3):
    j = rng.normal(size=(t, 8)) + rng.normal(size=8)  # shared component: 0 usually not in hull
    d, _, w = _run(MGDA["none"], jnp.asarray(j, jnp.float32))
    d = np.asarray(d, np.float64)
    d_star = _exact_min_norm(j)
    scale = np.sqrt(np.trace(j @ j.T))
    np.testing.assert_allclose(d, d_star, atol=3e-3 * scale)
    assert np.all(np.asarray(w) >= 0) and abs(float(jnp.sum(w)) - 1) < 1e-5
    if d_star @ d_star > 1e-3 * scale ** 2:
      assert np.all(j @ d >= (1 - 1e-3) * (d @ d))


def test_normalizations():
  """'l2' makes the weights invariant to scaling one gradient (they see unit vectors); 'loss'
  divides by the losses; all combine the raw gradients: combined = Σ w_t g_t, w on Δ."""
  rng = np.random.default_rng(1)
  j = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  losses = jnp.asarray([0.5, 2.0, 1.0])
  _, _, w1 = _run(MGDA["l2"], j, losses)
  _, _, w2 = _run(MGDA["l2"], j * jnp.asarray([[10.0], [1.0], [1.0]]))
  np.testing.assert_allclose(w1, w2, atol=1e-4)
  d, _, w = _run(MGDA["loss"], j, losses)
  _, _, w_ref = _run(MGDA["none"], j / losses[:, None])
  np.testing.assert_allclose(w, w_ref, atol=1e-5)
  np.testing.assert_allclose(d, w @ j, atol=1e-5)
  _, _, w = _run(MGDA["loss+"], j, losses)
  _, _, w_ref = _run(MGDA["none"], j / (losses * jnp.linalg.norm(j, axis=1))[:, None])
  np.testing.assert_allclose(w, w_ref, atol=1e-5)
  with pytest.raises(ValueError, match="normalization"):
    W.get("mgda", normalization="bogus")


def test_adversarial_inputs_finite():
  base, cases = common.jacobian_cases(2)
  for norm in ("none", "l2", "loss+"):
    for name, j in cases.items():
      d, _, w = _run(MGDA[norm], jnp.asarray(j))
      assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)), (norm, name)
  d, _, w = _run(MGDA["none"], jnp.asarray(cases["conflict"]))
  np.testing.assert_allclose(d, 0.0, atol=1e-5)  # 0 is in the hull of g, -g
  _, _, w = _run(MGDA["none"], jnp.asarray(cases["t1"]))
  np.testing.assert_array_equal(w, [1.0])
  d, _, w = _run(MGDA["none"], jnp.asarray(cases["x100"]))
  assert np.all(base[:2] @ np.asarray(d) >= -1e-4)


def test_jit_vmap_pytree_agree():
  rng = np.random.default_rng(3)
  j = jnp.asarray(rng.normal(size=(4, 3, 12)), jnp.float32)
  method = MGDA["none"]
  state = method.init(3)
  losses = jnp.ones((3,))
  eager = method.update(j[0], state, losses=losses, key=KEY)
  batched = jax.jit(jax.vmap(lambda g: method.update(g, state, losses=losses, key=KEY)))(j)
  np.testing.assert_allclose(batched[0][0], eager[0], atol=1e-5)
  for k in range(4):
    d, _, w = _run(method, j[k])
    np.testing.assert_allclose(batched[2][k], w, atol=1e-5)
    tree = {"a": j[k][:, :5].reshape(3, 5, 1), "b": j[k][:, 5:]}
    dt, _, wt = _run(method, tree)
    np.testing.assert_allclose(wt, w, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate([dt["a"].reshape(-1), dt["b"]]), d, atol=1e-5)
