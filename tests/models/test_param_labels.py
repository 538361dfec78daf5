"""Every architecture labels every variable path as ``tests/fixtures/param_labels.json`` says.

EVIDENCE: the fixture was written by ``tests/fixtures/make_param_labels.py`` from the models as
they labelled their parameters by parsing Linen's generated names; the models now label them
from tables. Shapes only (``jax.eval_shape`` of ``init``): nothing compiles.
"""

import json

import pytest

from mtjax import models
from tests.fixtures import make_param_labels as gen

FIXTURE = json.loads(gen.OUT.read_text())


def test_every_architecture_is_in_the_fixture():
  assert {arch for _, arch, _ in gen.CASES} | {"segnet_mtan"} == set(models.names())
  assert set(FIXTURE) == {case for case, _, _ in gen.CASES} | {"segnet_mtan"}


@pytest.mark.parametrize("case", sorted(FIXTURE))
def test_labels_equal_the_fixture(case):
  assert gen.case_labels(case) == FIXTURE[case]
