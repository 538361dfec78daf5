"""The non-finite policy: checked on device in the step; "stop" ends the run before anything
non-finite is saved, "skip" leaves the state bitwise unchanged and counts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mtjax import checkpoint, weighting
from mtjax.errors import RunError
from mtjax.train import loop
from mtjax.train.state import healthy
from mtjax.train.step import check_health, shard_batch
from tests.helpers import scenes, tiny_config, tiny_trainer

TASKS = ("segmentation", "depth")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_check_health_records_the_first_bad_step_under_stop():
  health = healthy(3)
  ok, health = check_health(health, 4, jnp.array([1.0, jnp.nan, 2.0]), jnp.asarray(True),
                            jnp.asarray(True), nonfinite="stop", max_consecutive_skips=2)
  assert not ok and int(health.bad_step) == 4
  assert health.bad_losses.tolist() == [False, True, False] and not health.bad_grad
  _, health = check_health(health, 5, jnp.ones(3), jnp.asarray(False), jnp.asarray(True),
                           nonfinite="stop", max_consecutive_skips=2)
  assert int(health.bad_step) == 4 and not health.bad_grad  # the first one is kept
  assert int(health.skipped) == 0


def test_check_health_counts_skips_and_stops_at_the_streak_limit():
  health, losses = healthy(2), jnp.ones(2)
  verdicts = [True, False, True, False, False, False]
  for step, good in enumerate(verdicts, 1):
    _, health = check_health(health, step, losses, jnp.asarray(good), jnp.asarray(True),
                             nonfinite="skip", max_consecutive_skips=2)
    if step == 3:
      assert int(health.streak) == 0 and int(health.bad_step) == -1
  assert int(health.skipped) == 4 and int(health.streak) == 3
  assert int(health.bad_step) == 5 and bool(health.bad_grad)


def _nan_batch():
  batch = scenes(8, size=32)
  batch["image"] = batch["image"].astype(np.float32)
  batch["image"][0, 0, 0, 0] = np.nan
  return batch


def test_skip_leaves_the_state_bitwise_unchanged_but_advances_the_step():
  # FAMO: a stateful gradient-level method, so the weighting state is checked too.
  trainer, state, mesh = tiny_trainer(weighting.get("famo"), task_names=TASKS,
                                      devices=jax.devices()[:1], nonfinite="skip",
                                      max_consecutive_skips=3)
  state, _ = trainer.step(state, shard_batch(scenes(8, size=32), mesh))  # one good step
  before = jax.device_get(state)
  state, metrics = trainer.step(state, shard_batch(_nan_batch(), mesh))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1 and int(metrics["skipped"]) == 1
  for name in ("params", "batch_stats", "opt_state", "weighting_state", "key"):
    for x, y in zip(jax.tree_util.tree_leaves(getattr(before, name)),
                    jax.tree_util.tree_leaves(getattr(after, name)), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  assert int(after.health.streak) == 1 and int(after.health.bad_step) == -1
  state, _ = trainer.step(state, shard_batch(scenes(8, size=32, seed=1), mesh))
  assert int(state.health.streak) == 0 and int(state.health.skipped) == 1


def test_stop_names_the_step_and_the_tasks():
  trainer, state, mesh = tiny_trainer(weighting.get("ew"), task_names=TASKS,
                                      devices=jax.devices()[:1], optimizer=optax.sgd(0.1))
  state, _ = trainer.step(state, shard_batch(_nan_batch(), mesh))
  health = jax.device_get(state.health)
  assert int(health.bad_step) == 1 and health.bad_losses.tolist() == [True, True]
  with pytest.raises(RunError, match=r"step 1: the loss of segmentation, depth and the "
                                     r"gradient and the updated parameters were not finite"):
    loop.raise_if_unhealthy(state, TASKS, None)


def _all_checkpoints_finite(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  steps = checkpoint.all_steps(ckpt)
  for step in steps:
    assert checkpoint.all_finite(ocp.StandardCheckpointer().restore(
        os.path.join(ckpt, str(step), "state"))), step
  return steps


DIVERGING = {"tasks": TASKS, "optimizer.name": "sgd", "optimizer.schedule": "constant",
             "optimizer.learning_rate": 1e4, "optimizer.momentum": 0.0, "num_steps": 8,
             "log_every": 4, "eval_every": 0, "checkpoint_every": 1}


def test_skip_policy_stops_after_consecutive_skips_with_only_finite_checkpoints(data_dir,
                                                                               tmp_path):
  cfg = tiny_config(data_dir, nonfinite="skip", max_consecutive_skips=2, **DIVERGING)
  with pytest.raises(RunError, match=r"2 updates in a row were skipped"):
    loop.train(cfg, str(tmp_path), progress=False)
  assert _all_checkpoints_finite(tmp_path)
  assert not (tmp_path / "results.json").exists()


def test_bad_nonfinite_fields_are_refused(data_dir, tmp_path):
  for field, value, match in (("nonfinite", "ignore", r"config.nonfinite: got 'ignore'"),
                              ("max_consecutive_skips", 0, r"config.max_consecutive_skips")):
    cfg = tiny_config(data_dir, **{field: value})
    with pytest.raises(ValueError, match=match):
      loop.train(cfg, str(tmp_path), progress=False)
