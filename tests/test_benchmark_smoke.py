"""Smoke test of benchmarks/step_time.py: a tiny run end to end, its JSON and table."""

import json
import statistics

from benchmarks import step_time


def test_step_time_smoke(tmp_path):
  out = tmp_path / "bench"
  result = step_time.main(["--setup", "tiny", "--methods", "ew,pcgrad", "--levels",
                           "representation", "--steps", "2", "--warmup", "1",
                           "--image-size", "16", "--batch", "8", "--out", str(out)])
  with open(str(out) + ".json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result))
  order = [(r["method"], r["level"]) for r in saved["rows"]]
  assert order == [("ew", "loss"), ("pcgrad", "representation"), ("ew", "loss")]
  for r in saved["rows"]:
    assert "error" not in r, r.get("error")
    assert r["median_ms"] > 0 and r["compile_s"] > 0 and len(r["times_ms"]) == 2
  info = saved["info"]
  # The EW reference pools both EW measurements (start and end of the run).
  ew_times = saved["rows"][0]["times_ms"] + saved["rows"][2]["times_ms"]
  assert info["ew_median_ms"] == statistics.median(ew_times)
  pcgrad = saved["rows"][1]
  assert pcgrad["ratio"] == pcgrad["median_ms"] / info["ew_median_ms"]
  assert info["batch"] == 8 and info["image_size"] == [16, 16] and info["num_tasks"] == 3
  table = (tmp_path / "bench.md").read_text()
  assert "| ew | loss |" in table and "| pcgrad | representation |" in table


def test_fresh_state_matches_create():
  """The benchmark's per-method state has the shapes and dtypes the trainer's ``init`` gives."""
  import jax

  from mtjax import weighting

  args = step_time.parse_args(["--image-size", "16", "--batch", "8"])
  cfg = step_time.resolve(args)
  model, tasks, optimizer = step_time.build_setup(cfg)
  base = step_time.base_state(model, tasks, optimizer, cfg)
  for name, level in (("moco", "parameter"), ("moco", "representation"), ("famo", "loss")):
    method = weighting.get(name)
    grad_level = "parameter" if level == "loss" else level
    ours = step_time.fresh_state(base, model, method, len(tasks), grad_level, cfg)
    init = step_time.make_trainer(model, tasks, method, optimizer, grad_level, cfg, None).init
    ref = jax.eval_shape(init, jax.random.PRNGKey(0))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), t)
    assert shapes(ours) == shapes(ref), (name, level)
