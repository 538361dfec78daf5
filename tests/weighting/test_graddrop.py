"""GradDrop (Chen et al., 2020): one sign kept per element, with probability the sign purity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common

_METHOD = weighting.get("graddrop")
_JIT_UPDATE = jax.jit(_METHOD.update)


def _update(x, key, method=_METHOD, update=_JIT_UPDATE):
  x = jnp.asarray(x, jnp.float32) if isinstance(x, np.ndarray) else x
  num_tasks = jax.tree_util.tree_leaves(x)[0].shape[0]
  return update(x, method.init(num_tasks), losses=jnp.ones(num_tasks), key=key)


def test_keeps_one_sign_per_element():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 500))
  x[:, :50] = np.abs(x[:, :50])  # all tasks agree: always kept
  x[:, 50:100] = -np.abs(x[:, 50:100])
  positive, negative = np.maximum(x, 0).sum(0), np.minimum(x, 0).sum(0)
  combined, _, weights = _update(x, jax.random.PRNGKey(0))
  combined = np.asarray(combined)
  took_pos = np.isclose(combined, positive, rtol=1e-5, atol=1e-6)
  took_neg = np.isclose(combined, negative, rtol=1e-5, atol=1e-6)
  assert np.all(took_pos | took_neg)
  mixed = slice(100, None)
  assert took_pos[mixed].any() and took_neg[mixed].any()  # both signs survive somewhere
  np.testing.assert_allclose(combined[:100], x[:, :100].sum(0), rtol=1e-5)
  assert weights.shape == (3,) and np.all(np.isnan(weights))


def test_positive_sign_kept_with_probability_purity():
  # g_1 = a, g_2 = -1 everywhere: purity P = a / (a + 1).
  ratios = np.array([1 / 3, 1.0, 3.0])
  x = np.stack([np.repeat(ratios, 400), -np.ones(1200)])
  keys = jax.random.split(jax.random.PRNGKey(1), 16)
  combined = np.asarray(jax.vmap(lambda k: _update(x, k)[0])(keys))  # (16, 1200)
  kept_positive = (combined > 0).reshape(16, 3, 400).mean(axis=(0, 2))
  # 6400 draws per purity: standard error <= 0.00625; allow 4 of them.
  np.testing.assert_allclose(kept_positive, ratios / (ratios + 1), atol=0.025)


def test_leak_interpolates_with_the_sum():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 64))
  key = jax.random.PRNGKey(3)
  dropped = np.asarray(_update(x, key)[0])
  leaky = weighting.get("graddrop", leak=1.0)
  full = np.asarray(_update(x, key, leaky, leaky.update)[0])
  np.testing.assert_allclose(full, x.sum(0), rtol=1e-5, atol=1e-6)
  half = weighting.get("graddrop", leak=0.5)
  np.testing.assert_allclose(_update(x, key, half, half.update)[0],
                             0.5 * x.sum(0) + 0.5 * dropped, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="leak"):
    weighting.get("graddrop", leak=2.0)


def test_randomness_comes_from_key_only():
  x = np.random.default_rng(4).normal(size=(2, 200))
  a = np.asarray(_update(x, jax.random.PRNGKey(0))[0])
  np.testing.assert_array_equal(a, np.asarray(_update(x, jax.random.PRNGKey(0))[0]))
  assert np.any(a != np.asarray(_update(x, jax.random.PRNGKey(1))[0]))
  with pytest.raises(ValueError, match="key"):
    _METHOD.update(jnp.asarray(x), _METHOD.init(2), losses=jnp.ones(2), key=None)


def test_adversarial_inputs_stay_finite():
  rng = np.random.default_rng(5)
  g1, g2 = rng.normal(size=(2, 40))
  key = jax.random.PRNGKey(0)
  cases = common.pair_cases(g1, g2)
  for name, x in cases.items():
    combined = np.asarray(_update(x, key)[0])
    assert np.all(np.isfinite(combined)), name
  np.testing.assert_allclose(_update(cases["identical"], key)[0], 2 * g1, rtol=1e-6)
  np.testing.assert_allclose(_update(cases["zero"], key)[0], g1, rtol=1e-6)
  np.testing.assert_allclose(_update(cases["single"], key)[0], g1, rtol=1e-6)
  np.testing.assert_array_equal(_update(cases["all_zero"], key)[0], 0.0)
  # Opposite gradients: every element keeps exactly one of the two (P = 1/2).
  opposite = np.asarray(_update(cases["opposite"], key)[0])
  assert np.all(np.isclose(opposite, g1) | np.isclose(opposite, -g1))
  # The 100x task decides the sign almost everywhere.
  big = np.asarray(_update(cases["one_100x"], key)[0])
  assert np.mean(np.sign(big) == np.sign(g1)) > 0.9


def test_jit_vmap_and_pytree_agree():
  rng = np.random.default_rng(6)
  xs = jnp.asarray(rng.normal(size=(4, 3, 20)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  losses = jnp.ones(3)
  state = _METHOD.init(3)
  eager = _METHOD.update(xs[0], state, losses=losses, key=keys[0])
  jitted = [_update(x, k) for x, k in zip(xs, keys, strict=True)]
  np.testing.assert_array_equal(eager[0], jitted[0][0])
  batched = jax.vmap(lambda x, k: _METHOD.update(x, state, losses=losses, key=k))(xs, keys)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-6)
  tree = {"a": xs[0][:, :12].reshape(3, 3, 4), "b": xs[0][:, 12:]}
  tree_out = _update(tree, keys[0])[0]
  flat = jnp.concatenate([tree_out["a"].reshape(-1), tree_out["b"]])
  np.testing.assert_allclose(flat, eager[0], rtol=1e-6)
  # Leaf dtypes are kept.
  half = _update({"w": xs[0].astype(jnp.bfloat16)}, keys[0])[0]["w"]
  assert half.dtype == jnp.bfloat16
