"""Property-based tests (hypothesis) on edge inputs: the task losses and metrics with every pixel
ignored or a single class present, and every weighting method with identical, opposite, zero
and 1e-30 task gradients and losses of 1e10."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtjax import metrics, weighting
from mtjax.tasks import loss_and_parts
from tests.helpers import tiny_tasks

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
TASKS = tiny_tasks(("segmentation", "depth", "normals", "classification"))
N, H, W = 2, 4, 4


def _case(seed, scale, ignore_all, single_class):
  """Random outputs of every task and a batch; optionally no labelled pixel or one class."""
  rng = np.random.default_rng(seed)
  num_classes = _num_classes()
  labels = (np.full((N, H, W), int(rng.integers(num_classes))) if single_class
            else rng.integers(0, num_classes, (N, H, W)))
  if ignore_all:
    labels[:] = 255
  normals = rng.normal(size=(N, H, W, 3))
  batch = {
      "segmentation": labels.astype(np.int32),
      "depth": rng.uniform(0.5, 10.0, (N, H, W)).astype(np.float32),
      "depth_valid": np.full((N, H, W), not ignore_all),
      "normals": (normals / np.linalg.norm(normals, axis=-1, keepdims=True)).astype(np.float32),
      "labels": rng.integers(0, 2, (N, _num_labels())).astype(np.float32),
  }
  if ignore_all:
    batch["classification_mask"] = np.zeros((N,), bool)
  outputs = {
      "segmentation": scale * rng.normal(size=(N, H, W, num_classes)).astype(np.float32),
      "depth": scale * rng.normal(size=(N, H, W, 1)).astype(np.float32),
      "normals": scale * rng.normal(size=(N, H, W, 3)).astype(np.float32),
      "classification": scale * rng.normal(size=(N, _num_labels())).astype(np.float32),
  }
  return outputs, batch


@functools.cache
def _num_classes():
  from mtjax.data import dataset_info
  return dataset_info("shapes")["tasks"]["segmentation"]["num_classes"]


@functools.cache
def _num_labels():
  from mtjax.data import dataset_info
  return dataset_info("shapes")["tasks"]["classification"]["num_classes"]


EDGES = dict(seed=st.integers(0, 2**16), scale=st.sampled_from([0.0, 1e-30, 1.0, 1e10]),
             ignore_all=st.booleans(), single_class=st.booleans())


@SETTINGS
@given(**EDGES)
def test_losses_are_finite_with_finite_gradients_and_zero_when_nothing_is_labelled(
    seed, scale, ignore_all, single_class):
  outputs, batch = _case(seed, scale, ignore_all, single_class)
  for name, task in TASKS.items():
    loss, grad = jax.value_and_grad(lambda o, task=task: loss_and_parts(task, o, batch)[0])(
        jnp.asarray(outputs[name]))
    assert np.isfinite(loss) and loss >= 0, (name, loss)
    assert np.all(np.isfinite(grad)), name
    if ignore_all:
      assert loss == 0 and not np.any(grad), name


@SETTINGS
@given(**EDGES)
def test_metric_sums_are_finite_and_an_unlabelled_batch_adds_nothing(seed, scale, ignore_all,
                                                                     single_class):
  outputs, batch = _case(seed, scale, False, single_class)
  empty_outputs, empty = _case(seed + 1, scale, True, single_class)
  empty["mask"] = np.zeros((N,), bool)  # also masks the classification labels
  sums = {n: t.metrics_fn(jnp.asarray(outputs[n]), batch) for n, t in TASKS.items()}
  none = {n: t.metrics_fn(jnp.asarray(empty_outputs[n]), empty) for n, t in TASKS.items()}
  for leaf in jax.tree_util.tree_leaves((sums, none)):
    assert np.all(np.isfinite(leaf))
  for leaf in jax.tree_util.tree_leaves(none):
    assert not np.any(leaf)
  once = metrics.accumulate(None, sums)
  both = metrics.accumulate(metrics.accumulate(None, sums), none)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, once, both))
  results = metrics.summarize(TASKS, once)
  if ignore_all is False:
    for name, values in results.items():
      for metric, value in values.items():
        assert np.isfinite(value) or (name == "segmentation" and single_class), (name, metric)


METHODS = [n for n in weighting.names() if weighting.get(n).level != "meta"]
T, D = 3, 4


@functools.cache
def _update(name):
  return jax.jit(weighting.get(name).update)


def _grads(kind, seed, magnitude):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=D)
  rows = {"identical": [g, g, g], "opposite": [g, -g, rng.normal(size=D)],
          "zero": [np.zeros(D)] * T, "one_zero": [np.zeros(D), g, rng.normal(size=D)],
          "random": list(rng.normal(size=(T, D)))}[kind]
  return magnitude * np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["identical", "opposite", "zero", "one_zero", "random"]),
       magnitude=st.sampled_from([1.0, 1e-30, 1e3]), loss_scale=st.sampled_from([1.0, 1e10]),
       seed=st.integers(0, 2**16))
def test_methods_stay_finite_on_edge_gradients_and_losses(name, kind, magnitude, loss_scale,
                                                          seed):
  method = weighting.get(name)
  grads = jnp.asarray(_grads(kind, seed, magnitude))
  tree = {"w": grads[:, :2].reshape(T, 1, 2), "b": grads[:, 2:]}
  grads_like = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:]), tree)
  state = method.init(T, grads_like)
  losses = jnp.asarray(loss_scale * np.array([1.0, 2.0, 0.5]), jnp.float32)
  for _ in range(2):  # stateful methods: the second call uses the updated state
    combined, state, weights = _update(name)(tree, state, losses=losses,
                                             key=jax.random.PRNGKey(seed))
    assert weights.shape == (T,)
    for leaf in jax.tree_util.tree_leaves((combined, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (name, kind)
    if kind == "zero":
      for leaf in jax.tree_util.tree_leaves(combined):
        assert not np.any(np.asarray(leaf)), (name, "zero gradients give a non-zero direction")
