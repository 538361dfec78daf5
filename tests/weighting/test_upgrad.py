"""UPGrad (Quinton & Rey 2024): the average of the task gradients projected onto the dual cone."""

import pytest

from tests.weighting import common


@pytest.mark.parametrize("check", common.DUAL_CONE_CHECKS, ids=common.check_id)
def test_dual_cone_property(check):
  check("upgrad")
