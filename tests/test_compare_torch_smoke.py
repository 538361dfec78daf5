"""Smoke test of benchmarks/compare_torch.py's mtjax side (CI has no torch): a tiny run, its files.

The PyTorch side and the equal-weights check run wherever torch is installed
(``pip install -e ".[bench]"``, see benchmarks/README.md); here ``--torch off``.
"""

import json

from benchmarks import compare_torch


def test_compare_torch_mtjax_side(tmp_path):
  result = compare_torch.main(["--setup", "tiny", "--torch", "off", "--only", "ew,pcgrad_param",
                               "--image-size", "16", "--batch", "8", "--rounds", "2", "--steps",
                               "2", "--warmup", "0", "--block-warmup", "0", "--out", str(tmp_path),
                               "--allow-busy"])
  saved = json.loads((tmp_path / "compare_torch_tiny.json").read_text())
  assert saved == json.loads(json.dumps(result))
  assert [r["key"] for r in saved["rows"]] == ["ew", "pcgrad_param"]
  for r in saved["rows"]:
    assert "error" not in r["mtjax"], r["mtjax"].get("error")
    assert r["mtjax"]["n"] == 4 and r["mtjax"]["median_ms"] > 0 and r["peers"] == []
  info = saved["info"]
  assert info["versions"]["torch"] is None and info["check"] is None
  assert len(info["load_before"]) == 3 and info["hardware"]["jax_backend"] == "cpu"
  table = (tmp_path / "compare_torch_tiny.md").read_text()
  assert "| PCGrad, parameter level |" in table
  assert info["load_ok"] == (compare_torch.busy(info) is None)
  assert ("NOT A SPEED FIGURE" in table) == (not info["load_ok"])
  # A busy machine's run keeps its JSON but gets no table without --allow-busy.
  busy = {**info, "load_before": [99.0, 0, 0]}
  assert "on 2 usable cores" in compare_torch.busy({**busy, "hardware": {"cpus_usable": 2}})
  assert not compare_torch.write_table(str(tmp_path / "t.md"), busy, table, False)
  assert not (tmp_path / "t.md").exists()
