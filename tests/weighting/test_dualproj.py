"""DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone."""

import jax
import jax.numpy as jnp
import numpy as np

import mtjax.weighting as W

KEY = jax.random.PRNGKey(0)
METHOD = W.get("dualproj")
UPDATE = jax.jit(METHOD.update)


def _run(grads):
  t = jax.tree_util.tree_leaves(grads)[0].shape[0]
  return UPDATE(grads, METHOD.init(t), losses=jnp.ones((t,)), key=KEY)


def _conflict_bound(j, w, reg_eps=1e-4):
  """Prop. 1 with the ridge: <g_t, d> >= -reg_eps w_t tr(G) (exactly >= 0 without the ridge)."""
  return -reg_eps * np.abs(w) * np.trace(j @ j.T) - 1e-5 * np.trace(j @ j.T)


def test_non_conflicting():
  """<g_t, d> >= 0 for every task (by construction), random + adversarial."""
  rng = np.random.default_rng(0)
  cases = [rng.normal(size=(t, 10)) for t in (2, 3, 5) for _ in range(3)]
  a = rng.normal(size=10)
  cases += [np.stack([a, -a]), np.stack([a, -0.9 * a + 0.1 * rng.normal(size=10), a * 100]),
            rng.normal(size=(5, 2))]  # 5 gradients in 2 dims
  for j in cases:
    d, _, w = _run(jnp.asarray(j, jnp.float32))
    assert np.all(j @ np.asarray(d, np.float64) >= _conflict_bound(j, np.asarray(w)))
    np.testing.assert_allclose(d, np.asarray(w) @ j, atol=1e-5 * np.abs(j).max())


def test_mean_when_no_conflict_and_scaling():
  """Pairwise non-negative inner products => the result is exactly the mean (the mean is
  already in the dual cone); multiplying all gradients by k > 0 multiplies the result by k."""
  rng = np.random.default_rng(1)
  j = np.abs(rng.normal(size=(4, 10))).astype(np.float32)
  d, _, w = _run(jnp.asarray(j))
  np.testing.assert_allclose(w, np.full(4, 0.25), atol=1e-6)
  np.testing.assert_allclose(d, j.mean(0), atol=1e-6)
  j = rng.normal(size=(4, 10)).astype(np.float32)
  d1, _, w1 = _run(jnp.asarray(j))
  d2, _, w2 = _run(jnp.asarray(j * 7.0))
  np.testing.assert_allclose(w2, w1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d2, 7.0 * d1, rtol=1e-4, atol=1e-5)


def test_adversarial_inputs_finite():
  rng = np.random.default_rng(2)
  base = rng.normal(size=(3, 16)).astype(np.float32)
  cases = [np.stack([base[0], -base[0]]), np.stack([base[0], 0 * base[0], base[1]]),
           np.zeros((3, 16), np.float32), np.stack([base[0]] * 3), base[:1],
           np.stack([base[0] * 100, base[1]]), base * 1e-20]
  for j in cases:
    d, _, w = _run(jnp.asarray(j))
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
  d, _, _ = _run(jnp.asarray(base[:1]))
  np.testing.assert_allclose(d, base[0], atol=1e-6)  # T = 1: the gradient itself
  d, _, _ = _run(jnp.asarray(np.stack([base[0], -base[0]])))
  np.testing.assert_allclose(d, 0.0, atol=1e-3 * np.abs(base[0]).max())


def test_pref_vector():
  rng = np.random.default_rng(4)
  j = np.abs(rng.normal(size=(3, 8))).astype(np.float32)  # no conflict: Σ_t p_t g_t
  m = W.get("dualproj", pref_vector=(0.5, 0.3, 0.2))
  d, _, w = jax.jit(m.update)(jnp.asarray(j), m.init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w, [0.5, 0.3, 0.2], atol=1e-6)
  try:
    m.init(4)
    raise AssertionError("expected ValueError")
  except ValueError as e:
    assert "pref_vector" in str(e)


def test_jit_vmap_pytree_agree():
  rng = np.random.default_rng(3)
  j = jnp.asarray(rng.normal(size=(3, 3, 12)), jnp.float32)
  state = METHOD.init(3)
  eager = METHOD.update(j[0], state, losses=jnp.ones(3), key=KEY)
  batched = jax.jit(jax.vmap(lambda g: METHOD.update(g, state, losses=jnp.ones(3), key=KEY)))(j)
  np.testing.assert_allclose(batched[0][0], eager[0], atol=1e-5)
  for k in range(3):
    d, _, w = _run(j[k])
    np.testing.assert_allclose(batched[2][k], w, atol=1e-5)
    dt, _, wt = _run({"a": j[k][:, :5], "b": j[k][:, 5:].reshape(3, 7, 1)})
    np.testing.assert_allclose(wt, w, atol=1e-4)
    np.testing.assert_allclose(jnp.concatenate([dt["a"], dt["b"].reshape(-1)]), d, atol=1e-4)


def test_mean_kept_when_only_pairs_conflict():
  """If the mean itself does not conflict with any task, DualProj returns it unchanged, even
  when two tasks conflict with each other (where UPGrad would differ)."""
  j = np.array([[1.0, 0.0, 0.0], [-0.2, 1.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
  assert j[0] @ j[1] < 0 and np.all(j @ j.mean(0) > 0)
  d, _, w = _run(jnp.asarray(j))
  np.testing.assert_allclose(w, np.full(3, 1 / 3), atol=1e-6)
  np.testing.assert_allclose(d, j.mean(0), atol=1e-6)
