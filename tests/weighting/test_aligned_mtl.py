"""Aligned-MTL (Senushkin et al., 2023): aligned components orthogonal with equal norms."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.weighting.base import gram
from mtjax.weighting.gradient_surgery import aligned_mtl_matrix
from tests.weighting import common

_METHOD = weighting.get("aligned_mtl")


def _update(x, method=_METHOD):
  return common.run_once(method, x, key=None)


def _reference_weights(grads, scale_mode="min"):
  """The reference code (LibMTL Aligned_MTL.py / SamsungLabs ProcrustesSolver) in float64."""
  m = np.asarray(grads, np.float64) @ np.asarray(grads, np.float64).T
  lam, v = np.linalg.eigh(m)
  tol = lam.max() * m.shape[0] * np.finfo(np.float32).eps
  order = np.argsort(lam)[::-1]
  lam, v = lam[order], v[:, order]
  rank = int(np.sum(lam > tol))
  lam, v = lam[:rank], v[:, :rank]
  scale = {"min": lam[-1], "median": np.sort(lam)[(rank - 1) // 2], "rmse": lam.mean()}[scale_mode]
  b = np.sqrt(scale) * (v / np.sqrt(lam)) @ v.T
  return b.sum(0)


def test_aligned_components_are_orthogonal_with_equal_norms():
  rng = np.random.default_rng(0)
  for num_tasks in (2, 3, 5):
    x = rng.normal(size=(num_tasks, 40)) * rng.uniform(0.1, 10.0, size=(num_tasks, 1))
    g = gram(jnp.asarray(x, jnp.float32))
    b = np.asarray(aligned_mtl_matrix(g))
    aligned = b.T @ x  # row k: Σ_t B[t, k] g_t
    lam_min = np.linalg.eigvalsh(x @ x.T).min()
    # The aligned Gram matrix is λ_min I: condition number 1 (the stability criterion).
    np.testing.assert_allclose(aligned @ aligned.T, lam_min * np.eye(num_tasks),
                               atol=2e-4 * lam_min * num_tasks)
    combined, _, weights = _update(x)
    np.testing.assert_allclose(combined, aligned.sum(0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(weights, _reference_weights(x), rtol=1e-3, atol=1e-5)


def test_orthogonal_gradients_rescaled_to_the_smallest_norm():
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 3)))
  equal = 2.0 * q.T
  combined, _, weights = _update(equal)
  np.testing.assert_allclose(weights, np.ones(3), rtol=1e-5)
  np.testing.assert_allclose(combined, equal.sum(0), rtol=1e-5, atol=1e-6)
  norms = np.array([0.5, 2.0, 8.0])
  _, _, weights = _update(norms[:, None] * q.T)
  np.testing.assert_allclose(weights, 0.5 / norms, rtol=1e-5)


@pytest.mark.parametrize("scale_mode", ["median", "rmse"])
def test_scale_modes_match_reference(scale_mode):
  method = weighting.get("aligned_mtl", scale_mode=scale_mode)
  x = np.random.default_rng(2).normal(size=(4, 25)) * np.array([[0.3], [1.0], [3.0], [5.0]])
  _, _, weights = _update(x, method)
  np.testing.assert_allclose(weights, _reference_weights(x, scale_mode), rtol=1e-3, atol=1e-5)
  with pytest.raises(ValueError, match="scale_mode"):
    weighting.get("aligned_mtl", scale_mode="max")


def test_rank_deficient_and_adversarial_inputs():
  rng = np.random.default_rng(3)
  g1, g2 = rng.normal(size=(2, 40))
  cases = {
      "conflicting": np.stack([g1, -g1 + 0.1 * g2]),
      "opposite": np.stack([g1, -g1]),
      "one_100x": np.stack([100.0 * g1, g2]),
      "identical": np.stack([g1, g1]),
      "zero": np.stack([g1, 0.0 * g2]),
      "identical_and_other": np.stack([g1, g1, g2]),
      "all_zero": np.zeros((2, 40)),
      "single": g1[None],
      "tiny": 1e-20 * np.stack([g1, g2]),
  }
  for name, x in cases.items():
    combined, _, weights = _update(x)
    assert np.all(np.isfinite(combined)) and np.all(np.isfinite(weights)), name
    if name not in ("all_zero", "tiny"):
      np.testing.assert_allclose(weights, _reference_weights(x), rtol=1e-3, atol=1e-4,
                                 err_msg=name)
  # Rank one: identical gradients are summed, a zero gradient is ignored, T=1 is the identity.
  np.testing.assert_allclose(_update(cases["identical"])[0], 2 * g1, rtol=1e-4)
  np.testing.assert_allclose(_update(cases["zero"])[0], g1, rtol=1e-5)
  np.testing.assert_allclose(_update(cases["single"])[0], g1, rtol=1e-5)
  # Scale invariance of the weights.
  x = rng.normal(size=(3, 40))
  np.testing.assert_allclose(_update(1e3 * x)[2], _update(x)[2], rtol=1e-4)


def test_jit_vmap_and_pytree_agree():
  common.check_eager_jit_vmap_tree(_METHOD, 4)
