"""ConFIG (Liu et al., 2024): equal positive cosine with every task gradient, projection length."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

_METHOD = weighting.get("con_fig")
_JIT_UPDATE = jax.jit(_METHOD.update)


def _update(x):
  x = jnp.asarray(x, jnp.float32) if isinstance(x, np.ndarray) else x
  num_tasks = jax.tree_util.tree_leaves(x)[0].shape[0]
  return _JIT_UPDATE(x, _METHOD.init(num_tasks), losses=jnp.ones(num_tasks), key=None)


def _cosines(direction, grads):
  direction = np.asarray(direction, np.float64)
  return grads @ direction / (np.linalg.norm(grads, axis=1) * np.linalg.norm(direction))


def _reference(grads):
  """The reference ConFIG_update in float64: lstsq on unit gradients, ProjectionLength."""
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  best = np.linalg.lstsq(units, np.ones(len(grads)), rcond=None)[0]
  unit = best / np.linalg.norm(best)
  return np.sum(grads @ unit) * unit


def test_equal_positive_cosine_and_projection_length():
  rng = np.random.default_rng(0)
  for num_tasks in (2, 3, 4, 5):
    for _ in range(3):
      x = rng.normal(size=(num_tasks, 30)) * rng.uniform(0.1, 10.0, size=(num_tasks, 1))
      combined, _, weights = _update(x)
      combined = np.asarray(combined, np.float64)
      cos = _cosines(combined, x)
      assert np.all(cos > 0)
      np.testing.assert_allclose(cos, cos.mean(), rtol=1e-4)
      unit = combined / np.linalg.norm(combined)
      np.testing.assert_allclose(np.linalg.norm(combined), np.sum(x @ unit), rtol=1e-4)
      np.testing.assert_allclose(combined, _reference(x), rtol=1e-3, atol=1e-4)
      np.testing.assert_allclose(weights @ x, combined, rtol=1e-4, atol=1e-5)


def test_conflicting_gradients_get_a_conflict_free_update():
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(20, 2)))
  g1, g2 = q.T  # orthonormal
  x = np.stack([5.0 * g1, -0.5 * g1 + g2])
  assert x[0] @ x[1] < 0 and x.sum(0) @ x[1] < 0  # the plain sum conflicts with task 2
  combined = np.asarray(_update(x)[0])
  assert combined @ x[0] > 0 and combined @ x[1] > 0
  # One gradient 100x larger does not change the angles, only the length.
  big = np.stack([100.0 * g1, g2])
  cos = _cosines(_update(big)[0], big)
  np.testing.assert_allclose(cos[0], cos[1], rtol=1e-4)


def test_rank_deficient_and_adversarial_inputs():
  rng = np.random.default_rng(2)
  g1, g2 = rng.normal(size=(2, 40))
  cases = {
      "opposite": np.stack([g1, -g1]),
      "identical": np.stack([g1, g1, g1]),
      "zero": np.stack([g1, 0.0 * g2]),
      "identical_and_other": np.stack([g1, g1, g2]),
      "all_zero": np.zeros((2, 40)),
      "single": g1[None],
      "tiny": 1e-20 * np.stack([g1, g2]),
      "more_tasks_than_dims": rng.normal(size=(5, 3)),
  }
  for name, x in cases.items():
    combined, _, weights = _update(x)
    assert np.all(np.isfinite(combined)) and np.all(np.isfinite(weights)), name
  # Identical gradients: the gradient's direction, length T |g| (their sum).
  np.testing.assert_allclose(_update(cases["identical"])[0], 3 * g1, rtol=1e-4)
  np.testing.assert_allclose(_update(cases["zero"])[0], g1, rtol=1e-4)
  np.testing.assert_allclose(_update(cases["single"])[0], g1, rtol=1e-5)
  np.testing.assert_allclose(_update(cases["opposite"])[0], 0.0, atol=1e-5)
  # A duplicated task counts once in the direction: same as ConFIG on (g1, g2), 3 projections.
  combined = np.asarray(_update(cases["identical_and_other"])[0], np.float64)
  cos = _cosines(combined, cases["identical_and_other"])
  np.testing.assert_allclose(cos, cos.mean(), rtol=1e-4)


def test_jit_vmap_and_pytree_agree():
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.normal(size=(4, 3, 20)), jnp.float32)
  losses = jnp.ones(3)
  state = _METHOD.init(3)
  eager = _METHOD.update(xs[0], state, losses=losses, key=None)
  jitted = [_update(x) for x in xs]
  np.testing.assert_allclose(eager[0], jitted[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eager[2], jitted[0][2], rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda x: _METHOD.update(x, state, losses=losses, key=None))(xs)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(batched[2], np.stack([j[2] for j in jitted]), rtol=1e-4, atol=1e-5)
  tree = {"a": xs[0][:, :12].reshape(3, 3, 4), "b": xs[0][:, 12:]}
  tree_out = _update(tree)
  flat = jnp.concatenate([tree_out[0]["a"].reshape(-1), tree_out[0]["b"]])
  np.testing.assert_allclose(flat, eager[0], rtol=1e-5, atol=1e-6)
