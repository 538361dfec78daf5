"""Nash-MTL (Navon et al. 2022): α ⊙ (G α) = 1 (Eq. 4), scale equivariance, clipping, state."""

import jax
import jax.numpy as jnp
import numpy as np

import mtjax.weighting as W
from mtjax.weighting.multi_objective import nash_alpha
from tests.weighting import common

NOCLIP = W.get("nash_mtl", max_norm=0.0)
CLIP = W.get("nash_mtl")
EVERY3 = W.get("nash_mtl", max_norm=0.0, update_weights_every=3)


def test_bargaining_residual():
  """|α ⊙ ((Ĝ + 1e-6 I) α) - 1| <= 2e-5 with Ĝ = G/|G|_F (the ridged problem solved) and
  |α ⊙ (Ĝ α) - 1| <= 1e-6 max α² + 2e-5 (the ridge's bias) on random problems, 20 steps."""
  rng = np.random.default_rng(0)
  solve = jax.jit(nash_alpha, static_argnums=2)
  for t in (2, 3, 5):
    for _ in range(4):
      j = rng.normal(size=(t, 30)) * rng.uniform(0.1, 10.0, (t, 1))
      g = j @ j.T
      a = np.asarray(solve(jnp.asarray(g, jnp.float32), jnp.ones(t), 20), np.float64)
      assert np.all(a > 0)
      gn = g / np.linalg.norm(g)
      np.testing.assert_allclose(a * ((gn + 1e-6 * np.eye(t)) @ a), 1.0, atol=2e-5)
      np.testing.assert_allclose(a * (gn @ a), 1.0, atol=1e-6 * np.max(a) ** 2 + 2e-5)


def test_scale_equivariance_and_combined():
  """Scaling task 0's gradient by k scales its α by 1/k relative to the others (Navon et al.,
  Sec. 3), so Σ α_t g_t keeps its direction; combined == Σ α_t g_t."""
  rng = np.random.default_rng(1)
  j = rng.normal(size=(3, 20)).astype(np.float32)
  d1, _, a1 = common.run_once(NOCLIP, jnp.asarray(j))
  j2 = j.copy()
  j2[0] *= 10.0
  d2, _, a2 = common.run_once(NOCLIP, jnp.asarray(j2))
  r1, r2 = np.asarray(a1) / a1[1], np.asarray(a2) / a2[1]
  np.testing.assert_allclose(r2, r1 * np.array([0.1, 1, 1]), rtol=1e-3)
  cos = d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2)
  assert cos > 1 - 1e-5
  np.testing.assert_allclose(d1, np.asarray(a1) @ j, rtol=1e-5, atol=1e-6)


def test_clip_and_state():
  rng = np.random.default_rng(2)
  j = jnp.asarray(rng.normal(size=(3, 20)) * 5, jnp.float32)
  d, state, w = common.run_once(CLIP, j)
  assert abs(float(jnp.linalg.norm(d)) - 1.0) < 1e-4  # |Σ α g| > 1 is clipped to max_norm=1
  assert int(state.step) == 1
  _, s_noclip, a = common.run_once(NOCLIP, j)
  np.testing.assert_allclose(state.alpha, a, rtol=1e-6)  # the state keeps the unclipped α
  j2 = j * jnp.asarray([[10.0], [1.0], [1.0]])
  _, s, w0 = common.run_once(EVERY3, j)
  _, s, w1 = common.run_once(EVERY3, j2, s)  # not an update step: the last α is reused
  np.testing.assert_array_equal(w1, w0)
  _, s, _ = common.run_once(EVERY3, j2, s)
  _, s, w3 = common.run_once(EVERY3, j2, s)  # step 3: recomputed for the new gradients
  _, _, fresh = common.run_once(NOCLIP, j2)
  np.testing.assert_allclose(w3, fresh, rtol=1e-4)
  np.testing.assert_allclose(w3[0] / w3[1], 0.1 * w0[0] / w0[1], rtol=1e-3)


def test_adversarial_inputs_finite():
  _, cases = common.jacobian_cases(3)
  for method in (CLIP, NOCLIP):
    for j in cases.values():
      d, state, w = common.run_once(method, jnp.asarray(j))
      assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)) and np.all(state.alpha > 0)


def test_jit_vmap_pytree_agree():
  common.check_batched_and_tree(CLIP, 4, {"rtol": 1e-4}, {"rtol": 1e-4}, {"atol": 1e-5})
