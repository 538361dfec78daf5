"""Faults tried with real processes (``python -m mtjax.cli``): a diverging run, a truncated
checkpoint, ``kill -9`` at random moments. Each test prints how many faults it tried."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtjax import checkpoint
from tests.helpers import read_log, restore_latest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/shapes.py"
TINY = ["--config.dataset.image_size=(32, 32)", "--config.dataset.split_sizes.train=16",
        "--config.dataset.split_sizes.validation=8", "--config.dataset.split_sizes.test=8",
        "--config.model.width=8", "--config.model.head_hidden=8", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.tasks=('segmentation', 'depth')",
        "--config.num_steps=12", "--config.log_every=1", "--config.eval_every=0",
        "--config.checkpoint_every=2", "--config.keep_checkpoints=3", "--progress_bar=false"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  data = tmp_path_factory.mktemp("data")
  return {**os.environ, "MTJAX_DATA_DIR": str(data), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")}


def _args(workdir, *extra):
  return [sys.executable, "-m", "mtjax.cli", "train", "--config", CONFIG, "--workdir",
          str(workdir), *TINY, *extra]


def _train(workdir, env, *extra):
  return subprocess.run(_args(workdir, *extra), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An undisturbed run: the bits every disturbed run must end with."""
  workdir = tmp_path_factory.mktemp("reference")
  run = _train(workdir, env)
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir


def _state(workdir):
  return restore_latest(workdir)


def _log(workdir):
  return read_log(workdir)


def _assert_same_run(a, b):
  (step_a, state_a), (step_b, state_b) = _state(a), _state(b)
  assert step_a == step_b == 12
  import jax
  leaves_a, leaves_b = jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert _log(a) == _log(b)
  with open(os.path.join(a, "results.json")) as fa, open(os.path.join(b, "results.json")) as fb:
    assert json.load(fa)["test"] == json.load(fb)["test"]


def test_diverging_run_stops_with_the_step_and_saves_nothing_non_finite(env, tmp_path):
  run = _train(tmp_path, env, "--config.optimizer.name=sgd", "--config.optimizer.schedule=constant",
               "--config.optimizer.learning_rate=1e4", "--config.optimizer.momentum=0.0")
  print("faults tried: 1 (SGD at a learning rate of 1e4)")
  assert run.returncode == 1, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("mtjax: error: step "), last
  assert "not finite (config.nonfinite='stop')" in last
  assert "Traceback" not in run.stderr
  assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.md").exists()
  assert "| segmentation |" not in run.stdout
  for step in checkpoint.all_steps(str(tmp_path / "checkpoints")):
    state = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / str(step) / "state"))
    assert checkpoint.all_finite(state), step
    assert f"step {step} " not in last  # the run stopped before a step it saved


def test_truncated_checkpoint_falls_back_and_ends_bitwise_equal(env, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  newest = workdir / "checkpoints" / "12"
  files = [os.path.join(r, f) for r, _, fs in os.walk(newest) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  print("faults tried: 1 (the largest file of the newest checkpoint cut in half)")
  run = _train(workdir, env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "mtjax: warning: checkpoint step 12 cannot be read" in run.stderr
  assert "continuing from step 10" in run.stderr
  assert (workdir / "checkpoints" / "damaged-12-0").is_dir()  # kept for the user to inspect
  _assert_same_run(reference, workdir)


def test_kill_9_at_random_moments_then_resume_ends_bitwise_equal(env, reference, tmp_path):
  rng = random.Random(11)
  log = tmp_path / "metrics.jsonl"
  kills = 0
  for _ in range(2):
    lines = len(log.read_text().splitlines()) if log.exists() else 0
    proc = subprocess.Popen(_args(tmp_path), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:  # until it trains a step
      if log.exists() and len(log.read_text().splitlines()) != lines:
        break
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait(timeout=60)
  print(f"faults tried: {kills} kill -9 at random moments")
  assert kills >= 1
  run = _train(tmp_path, env)
  assert run.returncode == 0, run.stderr[-3000:]
  _assert_same_run(reference, tmp_path)
