"""ConFIG (Liu et al., 2024): equal positive cosine with every task gradient, projection length."""

import numpy as np

from mtjax import weighting
from tests.weighting import common

_METHOD = weighting.get("con_fig")


def _update(x):
  return common.run_once(_METHOD, x, key=None)


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
  common.check_eager_jit_vmap_tree(_METHOD, 3)
