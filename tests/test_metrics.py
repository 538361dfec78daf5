"""Δm% against the published NYUv2 table (../shared/REFERENCE.md, Nash-MTL 2022 Table 2)."""

import math

import pytest

from mtjax import metrics, tasks

TASKS = {"segmentation": tasks.get("segmentation", 13), "depth": tasks.get("depth"),
         "normals": tasks.get("normals")}


def _row(miou, pix, abs_err, rel_err, mean, med, t1, t2, t3):
  return {"segmentation": {"miou": miou, "pixel_acc": pix},
          "depth": {"abs_err": abs_err, "rel_err": rel_err},
          "normals": {"mean_angle": mean, "median_angle": med, "within_11_25": t1,
                      "within_22_5": t2, "within_30": t3}}


STL = _row(38.30, 63.76, .6754, .2780, 25.01, 19.21, 30.14, 57.20, 69.15)


@pytest.mark.parametrize("row,published", [
    (_row(39.29, 65.33, .5493, .2263, 28.15, 23.96, 22.09, 47.50, 61.08), 5.59),   # LS
    (_row(30.47, 59.90, .6070, .2555, 24.88, 19.45, 29.18, 56.88, 69.36), 1.38),   # MGDA
    (_row(40.13, 65.93, .5261, .2171, 25.26, 20.08, 28.40, 55.47, 68.15), -4.04),  # Nash-MTL
])
def test_delta_m_reproduces_published_values(row, published):
  assert abs(metrics.delta_m(TASKS, row, STL) - published) < 0.01


def test_delta_m_is_zero_against_itself_and_nan_without_baselines():
  assert metrics.delta_m(TASKS, STL, STL) == 0.0
  assert math.isnan(metrics.delta_m(TASKS, STL, {}))
