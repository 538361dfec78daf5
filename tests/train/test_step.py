"""The train step: per-task gradients, gradient levels, data parallelism, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.models import labels
from mtjax.train import step as step_lib
from mtjax.weighting.base import EmptyState, Method, weighted_sum
from tests.helpers import scenes, tiny_setup, tiny_trainer

BATCH = 8


def _sum_as_gradient_method():
  """Equal weights, but asking for per-task gradients (level "gradient")."""
  def update(task_grads, state, *, losses, key=None):
    weights = jnp.ones_like(losses)
    return weighted_sum(task_grads, weights), state, weights
  return Method(lambda num_tasks, grads_like=None: EmptyState(), update, "gradient")


def _run(method, grad_level="parameter", devices=None, steps=2, batch=None):
  trainer, state, mesh = tiny_trainer(method, grad_level, devices, batch=BATCH)
  batch = scenes(BATCH) if batch is None else batch
  for _ in range(steps):
    state, metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
  return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_per_task_gradients_match_separate_backward_passes():
  model, tasks, _ = tiny_setup()
  _, state, _ = tiny_trainer(_sum_as_gradient_method(), batch=BATCH)
  batch = jax.tree_util.tree_map(jnp.asarray, scenes(BATCH))

  def task_loss(params, name):
    variables = {"params": params, "batch_stats": state.batch_stats}
    out, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    return tasks[name].loss_fn(out[name], batch)

  @jax.jit  # one compile for both sides (eager dispatch of every op was most of the time)
  def both(params):
    terms = step_lib.task_terms(model, tasks, params, state.batch_stats, batch)
    separate = [labels.split(model, jax.grad(task_loss)(params, name))[labels.SHARED]
                for name in tasks]
    return terms.per_task()[0], separate

  task_grads, separate = both(state.params)
  for i, expected in enumerate(separate):
    got = jax.tree_util.tree_map(lambda g, i=i: g[i], task_grads)
    _assert_trees_close(got, expected, rtol=1e-4, atol=1e-6)


def test_gradient_levels_agree_with_loss_level_for_equal_weights():
  loss_state, loss_metrics = _run(weighting.get("ew"))
  for level in ("parameter", "representation"):
    state, metrics = _run(_sum_as_gradient_method(), level)
    _assert_trees_close(state.params, loss_state.params, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss_metrics["loss"], rtol=1e-5)


def test_loss_level_weights_scale_the_gradients():
  # Fixed weights (2, 0, 0, 0) must equal training on segmentation alone with its loss doubled.
  weighted, _ = _run(weighting.get("fixed", weights=(2.0, 0.0, 0.0, 0.0)), steps=1)
  model, tasks, opt = tiny_setup()
  _, state, _ = tiny_trainer(weighting.get("ew"), batch=BATCH)
  state = jax.device_get(state)
  batch = jax.tree_util.tree_map(jnp.asarray, scenes(BATCH))

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                         train=True, mutable=["batch_stats"])
    return 2.0 * tasks["segmentation"].loss_fn(out["segmentation"], batch)
  @jax.jit  # one compile (eager dispatch of every op was most of the time)
  def reference(params, opt_state):
    updates, _ = opt.update(jax.grad(loss)(params), opt_state, params)
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  expected = reference(state.params, state.opt_state)
  _assert_trees_close(weighted.params, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method_name,level", [("ew", "parameter"), ("pcgrad", "parameter"),
                                               ("mgda", "representation")])
def test_eight_devices_match_one_device(method_name, level):
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 CPU devices"
  one, m1 = _run(weighting.get(method_name), level, devices=jax.devices()[:1], steps=3)
  eight, m8 = _run(weighting.get(method_name), level, devices=jax.devices(), steps=3)
  _assert_trees_close(eight.params, one.params, rtol=2e-4, atol=2e-6)
  _assert_trees_close(eight.batch_stats, one.batch_stats, rtol=2e-4, atol=2e-6)
  for name in m1:
    np.testing.assert_allclose(m8[name], m1[name], rtol=2e-4, atol=1e-6)


def test_same_key_same_result_bitwise():
  a, ma = _run(weighting.get("rlw"), steps=2)
  b, mb = _run(weighting.get("rlw"), steps=2)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert ma == mb


def test_state_step_and_key_handling():
  state, metrics = _run(weighting.get("rlw"), steps=2)
  assert int(state.step) == 2
  assert set(metrics) >= {"loss", "grad_norm", "loss/segmentation", "weight/segmentation"}
  assert all(np.isfinite(v) for v in metrics.values())


def test_missing_labels_are_skipped_not_nan():
  batch = scenes(BATCH)
  batch["depth_mask"] = np.zeros((BATCH,), np.float32)  # no depth label in this batch
  state, metrics = _run(weighting.get("ew"), steps=1, batch=batch)
  assert metrics["loss/depth"] == 0.0
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))


def test_bad_grad_level():
  with pytest.raises(ValueError, match="grad_level: got 'layer'"):
    tiny_trainer(weighting.get("ew"), grad_level="layer")
