"""experiments/libmtl_table.py: LibMTL's best-epoch rule and Δp (its count_improvement)."""

import json

import pytest

from experiments import libmtl_table


def _log(path, epochs):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "split": "train", "loss/depth": 1.0}) + "\n")
    for k, results in enumerate(epochs):
      record = {"step": k + 1, "split": "validation"}
      record.update({f"validation/{t}/{m}": v for t, ms in results.items() for m, v in ms.items()})
      f.write(json.dumps(record) + "\n")


BASE = {"segmentation": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.6, "rel_err": 0.2}}
NEW = {"segmentation": {"miou": 0.55, "pixel_acc": 0.78},
       "depth": {"abs_err": 0.57, "rel_err": 0.25}}


def test_improvement_is_libmtls_count_improvement():
  # segmentation: (+0.05/0.5 - 0.02/0.8) / 2 = 0.0375; depth (lower is better):
  # ((0.6-0.57)/0.6 + (0.2-0.25)/0.2) / 2 = -0.1; Δp = 100 (0.0375 - 0.1) / 2 = -3.125.
  assert libmtl_table.improvement(BASE, NEW) == pytest.approx(-3.125)
  assert libmtl_table.improvement(BASE, BASE) == 0.0


def test_best_epoch_is_the_largest_improvement_on_the_first_epoch(tmp_path):
  better = {"segmentation": {"miou": 0.6, "pixel_acc": 0.85},
            "depth": {"abs_err": 0.5, "rel_err": 0.18}}
  _log(tmp_path / "run", [BASE, NEW, better, NEW])
  _log(tmp_path / "stl", [NEW, BASE])
  epochs = libmtl_table.read_epochs(str(tmp_path / "run"))
  assert libmtl_table.best_epoch(epochs) == 2
  text = libmtl_table.table(str(tmp_path / "run"), [str(tmp_path / "stl")], last=2)
  rows = text.splitlines()
  assert rows[2].startswith("| single-task (best epochs) | 0.5000 | 0.8000 | 0.6000 | 0.2000 |")
  assert rows[3].startswith("| best epoch (3 of 4) | 0.6000 |")
  assert rows[3].endswith(f"| {libmtl_table.improvement(BASE, better):+.2f} |")
  assert rows[4].startswith("| mean of the last 2 | 0.5750 |")
