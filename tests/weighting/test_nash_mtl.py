"""Nash-MTL (Navon et al. 2022): α ⊙ (G α) = 1 (Eq. 4), scale equivariance, clipping, state."""

import jax
import jax.numpy as jnp
import numpy as np

import mtjax.weighting as W
from mtjax.weighting.multi_objective import nash_alpha

KEY = jax.random.PRNGKey(0)
NOCLIP = W.get("nash_mtl", max_norm=0.0)
CLIP = W.get("nash_mtl")
EVERY3 = W.get("nash_mtl", max_norm=0.0, update_weights_every=3)
_JIT = {}


def _run(method, grads, state=None):
  t = jax.tree_util.tree_leaves(grads)[0].shape[0]
  state = method.init(t) if state is None else state
  update = _JIT.setdefault(method.update, jax.jit(method.update))
  return update(grads, state, losses=jnp.ones((t,)), key=KEY)


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
  d1, _, a1 = _run(NOCLIP, jnp.asarray(j))
  j2 = j.copy()
  j2[0] *= 10.0
  d2, _, a2 = _run(NOCLIP, jnp.asarray(j2))
  r1, r2 = np.asarray(a1) / a1[1], np.asarray(a2) / a2[1]
  np.testing.assert_allclose(r2, r1 * np.array([0.1, 1, 1]), rtol=1e-3)
  cos = d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2)
  assert cos > 1 - 1e-5
  np.testing.assert_allclose(d1, np.asarray(a1) @ j, rtol=1e-5, atol=1e-6)


def test_clip_and_state():
  rng = np.random.default_rng(2)
  j = jnp.asarray(rng.normal(size=(3, 20)) * 5, jnp.float32)
  d, state, w = _run(CLIP, j)
  assert abs(float(jnp.linalg.norm(d)) - 1.0) < 1e-4  # |Σ α g| > 1 is clipped to max_norm=1
  assert int(state.step) == 1
  _, s_noclip, a = _run(NOCLIP, j)
  np.testing.assert_allclose(state.alpha, a, rtol=1e-6)  # the state keeps the unclipped α
  j2 = j * jnp.asarray([[10.0], [1.0], [1.0]])
  _, s, w0 = _run(EVERY3, j)
  _, s, w1 = _run(EVERY3, j2, s)  # not an update step: the last α is reused
  np.testing.assert_array_equal(w1, w0)
  _, s, _ = _run(EVERY3, j2, s)
  _, s, w3 = _run(EVERY3, j2, s)  # step 3: recomputed for the new gradients
  _, _, fresh = _run(NOCLIP, j2)
  np.testing.assert_allclose(w3, fresh, rtol=1e-4)
  np.testing.assert_allclose(w3[0] / w3[1], 0.1 * w0[0] / w0[1], rtol=1e-3)


def test_adversarial_inputs_finite():
  rng = np.random.default_rng(3)
  base = rng.normal(size=(3, 16)).astype(np.float32)
  cases = [np.stack([base[0], -base[0]]), np.stack([base[0], 0 * base[0], base[1]]),
           np.zeros((3, 16), np.float32), np.stack([base[0]] * 3), base[:1],
           np.stack([base[0] * 100, base[1]]), base * 1e-20]
  for method in (CLIP, NOCLIP):
    for j in cases:
      d, state, w = _run(method, jnp.asarray(j))
      assert np.all(np.isfinite(d)) and np.all(np.isfinite(w)) and np.all(state.alpha > 0)


def test_jit_vmap_pytree_agree():
  rng = np.random.default_rng(4)
  j = jnp.asarray(rng.normal(size=(3, 3, 12)), jnp.float32)
  state = CLIP.init(3)
  eager = CLIP.update(j[0], state, losses=jnp.ones(3), key=KEY)
  batched = jax.jit(jax.vmap(lambda g: CLIP.update(g, state, losses=jnp.ones(3), key=KEY)))(j)
  np.testing.assert_allclose(batched[0][0], eager[0], atol=1e-5)
  for k in range(3):
    d, _, w = _run(CLIP, j[k])
    np.testing.assert_allclose(batched[2][k], w, rtol=1e-4)
    dt, _, wt = _run(CLIP, {"a": j[k][:, :5], "b": j[k][:, 5:].reshape(3, 7, 1)})
    np.testing.assert_allclose(wt, w, rtol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dt["a"], dt["b"].reshape(-1)]), d, atol=1e-5)
