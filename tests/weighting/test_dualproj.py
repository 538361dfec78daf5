"""DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone."""

import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common


@pytest.mark.parametrize("check", common.DUAL_CONE_CHECKS, ids=common.check_id)
def test_dual_cone_property(check):
  check("dualproj")


def test_mean_kept_when_only_pairs_conflict():
  """If the mean itself does not conflict with any task, DualProj returns it unchanged, even
  when two tasks conflict with each other (where UPGrad would differ)."""
  j = np.array([[1.0, 0.0, 0.0], [-0.2, 1.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
  assert j[0] @ j[1] < 0 and np.all(j @ j.mean(0) > 0)
  d, _, w = common.run_once(W.get("dualproj"), jnp.asarray(j))
  np.testing.assert_allclose(w, np.full(3, 1 / 3), atol=1e-6)
  np.testing.assert_allclose(d, j.mean(0), atol=1e-6)
