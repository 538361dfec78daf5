"""The command line, as the README runs it (in a subprocess, on a tiny build)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.image_size=(32, 32)", "--config.dataset.split_sizes.train=16",
        "--config.dataset.split_sizes.validation=8", "--config.dataset.split_sizes.test=8",
        "--config.model.width=8", "--config.model.head_hidden=8", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.num_steps=2", "--config.log_every=1",
        "--config.eval_every=0", "--progress_bar=false"]


def _mtjax(*args, env=None):
  return subprocess.run([sys.executable, "-m", "mtjax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_train_then_eval_with_method_hyperparameters(tmp_path):
  env = {**os.environ, "MTJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  config = "experiments/configs/shapes.py:fixed"
  workdir = str(tmp_path / "run")
  groups = ['--config.optimizer.frozen=("shared/stem",)',
            '--config.optimizer.lr_scale=(("shared", 0.5), ("depth", 2.0))']
  run = _mtjax("train", "--config", config, "--workdir", workdir,
               "--config.weighting.weights=(1.0, 0.0, 2.0)", *groups, *TINY, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| segmentation | miou |" in run.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  with open(os.path.join(workdir, "config.json")) as f:
    optimizer = json.load(f)["optimizer"]
  assert optimizer["frozen"] == ["shared/stem"]
  assert optimizer["lr_scale"] == [["shared", 0.5], ["depth", 2.0]]
  assert (first["weight/segmentation"], first["weight/depth"], first["weight/normals"]) == (
      1.0, 0.0, 2.0)
  again = _mtjax("eval", "--config", config, "--workdir", workdir,
                 "--config.weighting.weights=(1.0, 0.0, 2.0)", *groups, *TINY, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  other = _mtjax("train", "--config", "experiments/configs/shapes.py:pcgrad", "--workdir",
                 workdir, *TINY, env=env)
  assert other.returncode != 0
  assert "holds a checkpoint (step 2) of a different config" in other.stderr


@pytest.mark.parametrize("args,message", [
    ([], "usage: mtjax {train|eval}"),
    (["fit"], "usage: mtjax {train|eval}"),
])
def test_usage_errors(args, message):
  run = _mtjax(*args)
  assert run.returncode == 2 and message in run.stderr
