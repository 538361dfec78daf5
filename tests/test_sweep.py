"""The sweep runner: single-task baselines, every method, the Δm% table."""

import importlib.util
import pathlib

from tests.helpers import tiny_config

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "sweep.py"


def _sweep_module():
  spec = importlib.util.spec_from_file_location("sweep", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_trains_baselines_and_methods_and_writes_the_table(tmp_path):
  sweep = _sweep_module()
  cfg = tiny_config(tmp_path / "data", tasks=("segmentation", "normals"), num_steps=2,
                    eval_every=0)
  result = sweep.run_sweep(cfg, str(tmp_path / "sweep"), ["ew", "pcgrad"])
  assert set(result["baselines"]) == {"segmentation", "normals"}
  assert set(result["baselines"]["normals"]) >= {"mean_angle", "within_11_25"}
  assert set(result["runs"]) == {"ew", "pcgrad"}
  assert result["runs"]["pcgrad"]["level"] == "gradient"
  table = (tmp_path / "sweep" / "sweep.md").read_text()
  assert "| single-task baselines |" in table and "| pcgrad | gradient |" in table
  for run in result["runs"].values():
    assert run["delta_m"] == run["delta_m"]  # a number, not NaN: baselines were used
  # More rows against the same baselines (--baselines_from): no baseline is trained again; the
  # finished ew run is restored and gives the same Δm%.
  (tmp_path / "sweep" / "stl_normals" / "results.json").unlink()
  again = sweep.run_sweep(cfg, str(tmp_path / "sweep"), ["ew"], baselines=result["baselines"])
  assert again["baselines"] == result["baselines"]
  assert not (tmp_path / "sweep" / "stl_normals" / "results.json").exists()
  assert again["runs"]["ew"]["delta_m"] == result["runs"]["ew"]["delta_m"]
