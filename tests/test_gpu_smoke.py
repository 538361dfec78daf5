"""``GPU_DRY=1 bash benchmarks/gpu.sh smoke``: the device check, at a tiny size on the CPU."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_smoke_dry_run(tmp_path):
  env = {**os.environ, "GPU_DRY": "1", "OUT": str(tmp_path / "out"),
         "MTJAX_DATA_DIR": str(tmp_path / "data")}
  run = subprocess.run(["bash", "benchmarks/gpu.sh", "smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  with open(tmp_path / "out" / "smoke.json") as f:
    saved = json.load(f)
  checks = [r["check"] for r in saved["rows"]]
  assert checks == ["default ×2 (run 1)", "default ×2 (run 2)", "det_seg (dry: 32×32)",
                    "nyuv2 ew (parameter)", "nyuv2 pcgrad (parameter)",
                    "nyuv2 upgrad (parameter)", "nyuv2 mgda (representation)"]
  for row in saved["rows"]:
    assert row["ok"], row
    assert row["compile_s"] > 0 and row["step_ms"] > 0, row
  assert "identical" in saved["rows"][1]["detail"]   # the two runs, bit for bit
  for row in saved["rows"][3:]:
    assert row["xla_peak_bytes"] > 0
  table = (tmp_path / "out" / "smoke.md").read_text()
  assert "| default ×2 (run 2) |" in table and "| nyuv2 mgda (representation) |" in table
