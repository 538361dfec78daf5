"""Task relations: gradient conflict, TAG's inter-task affinity, task grouping."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import relations, weighting
from mtjax.models import build, labels
from mtjax.tasks import loss_and_parts
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from tests.helpers import scenes, tiny_setup, tiny_tasks, tiny_trainer

NAMES = ("segmentation", "depth")


def _quadratic(theta):
  return jnp.sum((theta["w"] - 1.0) ** 2) + 0.5


def test_identical_tasks_have_cosine_one_and_symmetric_equal_affinity():
  theta = {"w": jnp.array([0.3, -2.0, 0.7])}
  loss = lambda th: jnp.stack([_quadratic(th), _quadratic(th)])  # noqa: E731
  aff = relations.lookahead_affinity(loss, theta, 0.1)
  np.testing.assert_allclose(aff, aff.T, rtol=0, atol=0)
  np.testing.assert_allclose(aff, jnp.full((2, 2), aff[0, 0]), rtol=1e-6)
  assert aff[0, 0] > 0  # a descent step lowers the (shared) loss
  grads = jax.vmap(jax.vjp(loss, theta)[1])(jnp.eye(2))[0]
  got = relations.conflict_from_grads(grads)
  np.testing.assert_allclose(got["conflict/cosine"], np.ones((2, 2)), atol=1e-6)
  assert float(got["conflict/fraction"]) == 0.0


def test_opposite_tasks_have_cosine_minus_one_and_negative_affinity():
  theta = {"w": jnp.array([0.3, -2.0, 0.7])}
  # Positive losses with opposite gradients: what helps one hurts the other.
  loss = lambda th: jnp.stack([_quadratic(th), 100.0 - _quadratic(th)])  # noqa: E731
  aff = np.asarray(relations.lookahead_affinity(loss, theta, 0.01))
  assert aff[0, 1] < 0 and aff[1, 0] < 0
  assert aff[0, 0] > 0 and aff[1, 1] > 0
  grads = jax.vmap(jax.vjp(loss, theta)[1])(jnp.eye(2))[0]
  got = relations.conflict_from_grads(grads)
  np.testing.assert_allclose(got["conflict/cosine"], [[1, -1], [-1, 1]], atol=1e-6)
  assert float(got["conflict/fraction"]) == 1.0
  g = np.asarray(grads["w"], np.float64)
  np.testing.assert_allclose(got["conflict/grad_norm"], np.linalg.norm(g, axis=1), rtol=1e-6)


def test_cosine_from_gram_edge_cases():
  # A zero gradient: cosine 0 with the others (not NaN), 1 with itself; no conflict counted.
  g = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
  cos, norms = relations.cosine_from_gram(g @ g.T)
  assert np.all(np.isfinite(cos))
  np.testing.assert_allclose(np.diag(cos), 1.0)
  np.testing.assert_allclose(cos[1], [0, 1, 0])
  np.testing.assert_allclose(cos[0, 2], -1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(norms, [1, 0, np.sqrt(2)], rtol=1e-6)
  assert float(relations.conflict_fraction(cos)) == pytest.approx(1 / 3)
  assert float(relations.conflict_fraction(jnp.ones((1, 1)))) == 0.0


def test_when_runs_the_branch_only_where_asked():
  fn = lambda x: {"a": x * 2}  # noqa: E731
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(relations.when(True, fn, x)["a"], x * 2)
  np.testing.assert_array_equal(relations.when(False, fn, x)["a"], jnp.zeros(3))
  both = jax.jit(lambda p: relations.when(p, fn, x))
  np.testing.assert_array_equal(both(jnp.array(True))["a"], x * 2)
  np.testing.assert_array_equal(both(jnp.array(False))["a"], jnp.zeros(3))


def _brute_force(a, k):
  """The best score over every assignment of tasks to k labels (all groups non-empty)."""
  t = a.shape[0]
  best = -np.inf
  for assign in itertools.product(range(k), repeat=t):
    if len(set(assign)) != k:
      continue
    groups = [[i for i in range(t) if assign[i] == g] for g in range(k)]
    best = max(best, relations.grouping_score(a, groups))
  return best


def test_group_tasks_finds_the_constructed_optimum():
  # Two clusters that help each other inside and hurt each other across.
  a = np.full((6, 6), -0.5)
  for block in ((0, 2, 4), (1, 3, 5)):
    for i in block:
      for j in block:
        a[i, j] = 1.0
  groups, score = relations.group_tasks(a, 2)
  assert groups == ((0, 2, 4), (1, 3, 5))
  assert score == pytest.approx(1.0)
  # One group must mix them; three groups split one cluster (a task alone scores 0).
  assert relations.group_tasks(a, 1)[1] == pytest.approx(0.1)  # (2·1 + 3·(-0.5)) / 5
  assert relations.group_tasks(a, 6) == (tuple((i,) for i in range(6)), 0.0)


@pytest.mark.parametrize("t,k", [(5, 2), (5, 3), (4, 4)])
def test_group_tasks_matches_brute_force(t, k):
  rng = np.random.default_rng(t * 10 + k)
  a = rng.normal(size=(t, t))
  groups, score = relations.group_tasks(a, k)
  assert sorted(i for g in groups for i in g) == list(range(t)) and len(groups) == k
  assert score == pytest.approx(_brute_force(a, k))
  assert score == pytest.approx(relations.grouping_score(a, groups))


def test_partitions_are_counted_by_stirling_numbers():
  assert len(list(relations._partitions(list(range(8)), 4))) == 1701  # S(8, 4)
  assert len(list(relations._partitions(list(range(5)), 2))) == 15    # S(5, 2)


@pytest.mark.parametrize("affinity,k,match", [
    (np.zeros((2, 3)), 1, "square"), (np.zeros((9, 9)), 2, "1 to 8"),
    (np.eye(3), 4, "num_groups"), (np.full((2, 2), np.nan), 1, "non-finite")])
def test_group_tasks_refuses_bad_input(affinity, k, match):
  with pytest.raises(ValueError, match=match):
    relations.group_tasks(affinity, k)


@pytest.fixture(scope="module")
def step_relations():
  """The step's conflict and affinity metrics (every step) with an independent reference."""
  batch = scenes(4, size=16)
  model, tasks, _ = tiny_setup(NAMES)
  trainer, state, mesh = tiny_trainer(
      weighting.get("ew"), task_names=NAMES, batch=4, size=16, conflict_every=1,
      conflict_level="parameter", affinity_every=1, lookahead_lr=0.5, donate=False,
      devices=jax.devices()[:1])
  assert trainer.conflict_level == "parameter"
  params, stats = jax.device_get((state.params, state.batch_stats))
  _, metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
  return (jax.device_get(metrics), model, tasks, params, stats,
          jax.tree_util.tree_map(jnp.asarray, batch))


def test_step_conflict_and_affinity_match_a_direct_computation(step_relations):
  out, model, tasks, params, stats, batch = step_relations
  own = labels.split(model, params)
  shared = own.pop(labels.SHARED)

  def losses(s):
    variables = {"params": labels.merge(s, *own.values()), "batch_stats": stats}
    outputs, _ = model.apply(variables, batch["image"], True, mutable=["batch_stats"])
    return jnp.stack([loss_and_parts(t, outputs[n], batch)[0] for n, t in tasks.items()])

  losses = jax.jit(losses)
  base = np.asarray(losses(shared), np.float64)
  g = jax.jit(jax.jacrev(losses))(shared)  # leaves with a leading task axis
  flat = np.concatenate([np.reshape(x, (len(NAMES), -1)) for x in jax.tree_util.tree_leaves(g)],
                        axis=1).astype(np.float64)
  norms = np.linalg.norm(flat, axis=1)
  cos = flat @ flat.T / np.outer(norms, norms)
  # A loss-level method asked for the parameter level: the per-task gradients of the shared
  # parameters under the cond.
  np.testing.assert_allclose(out["conflict/cosine"], cos, atol=2e-4)
  np.testing.assert_allclose(out["conflict/grad_norm"], norms, rtol=2e-4)
  assert out["conflict/fraction"] == float(cos[0, 1] < 0)
  expected = np.stack([
      1 - np.asarray(losses(jax.tree_util.tree_map(lambda p, gi, i=i: p - 0.5 * gi[i],
                                                    shared, g)), np.float64) / base
      for i in range(len(NAMES))])
  np.testing.assert_allclose(out["affinity"], expected, atol=2e-5)
  assert np.all(np.diag(out["affinity"]) > 0)  # each task's own step helps it


def test_conflict_level_rule_and_errors():
  model, _, _ = tiny_setup(NAMES)

  class NoEncoder:  # what a cross-stitch model looks like to the rule
    pass

  ew, mgda = weighting.get("ew"), weighting.get("mgda")
  level = step_lib.conflict_level_of
  assert level(model, ew, "parameter") == "representation"  # no level of its own: the features
  assert level(NoEncoder(), ew, "parameter") == "parameter"  # no shared features
  assert level(model, mgda, "parameter") == "parameter"  # a gradient method keeps its own
  assert level(model, mgda, "representation") == "representation"
  assert level(model, ew, "parameter", "parameter") == "parameter"
  assert level(model, mgda, "parameter", "representation") == "representation"
  with pytest.raises(ValueError, match=r"relations.conflict_level: got 'layer'"):
    level(model, ew, "parameter", "layer")
  with pytest.raises(ValueError, match=r"relations.conflict_level: 'representation'.*NoEncoder"):
    level(NoEncoder(), ew, "parameter", "representation")


def test_representation_conflict_of_identical_and_opposite_tasks_in_the_step():
  """Equal weighting (loss level) measures conflict on the shared features: tasks ``a`` and
  ``b`` are the same depth task with the same head (cosine 1), ``c`` its negated loss (cosine
  −1 with both); the norms are those of ∂L_t/∂features; measuring changes no bit of the step."""
  depth = tiny_tasks(("depth",))["depth"]
  negated = depth._replace(loss_fn=lambda out, batch: -loss_and_parts(depth, out, batch)[0])
  tasks = {"a": depth, "b": depth, "c": negated}
  model = build("resnet_tiny", tasks, width=8, output_stride=4, stem="small", head_hidden=8)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  kw = dict(image_shape=(16, 16, 3), batch_size=4, mesh=mesh, donate=False)
  measured = make_trainer(model, tasks, weighting.get("ew"), optax.sgd(0.1), conflict_every=1,
                          **kw)
  plain = make_trainer(model, tasks, weighting.get("ew"), optax.sgd(0.1), **kw)
  assert measured.conflict_level == "representation" and plain.conflict_level is None
  state = jax.device_get(measured.init(jax.random.PRNGKey(0)))
  for tree in (state.params, state.batch_stats):  # one head, three times
    tree["heads_b"] = tree["heads_c"] = tree["heads_a"]
  batch = jax.tree_util.tree_map(jnp.asarray, scenes(4, size=16))
  new, metrics = jax.device_get(measured.step(state, step_lib.shard_batch(batch, mesh)))
  np.testing.assert_allclose(metrics["conflict/cosine"],
                             [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-6)
  assert metrics["conflict/fraction"] == pytest.approx(2 / 3)

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  features, _ = model.apply(variables, batch["image"], True, method="encode",
                            mutable=["batch_stats"])

  def loss_of_features(f):
    out, _ = model.apply(variables, f, "a", (16, 16), True, method="decode",
                         mutable=["batch_stats"])
    return loss_and_parts(depth, out, batch)[0]

  norm = float(jnp.linalg.norm(jax.grad(loss_of_features)(features)))
  np.testing.assert_allclose(metrics["conflict/grad_norm"], [norm] * 3, rtol=1e-4)
  again, plain_metrics = jax.device_get(plain.step(state, step_lib.shard_batch(batch, mesh)))
  for x, y in zip(jax.tree_util.tree_leaves((new.params, new.batch_stats, new.opt_state)),
                  jax.tree_util.tree_leaves((again.params, again.batch_stats, again.opt_state)),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  assert plain_metrics["loss"] == metrics["loss"] and "conflict/cosine" not in plain_metrics


def test_group_command_reads_a_runs_affinity(tmp_path):
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  names = ["a", "b", "c", "d"]
  a = np.full((4, 4), -0.2)
  a[0, 3] = a[3, 0] = a[1, 2] = a[2, 1] = 0.6
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps(
      {"relations": {"tasks": names, "affinity": a.tolist(), "affinity_count": 7}}))
  run = subprocess.run([sys.executable, "-m", "mtjax.cli", "group", "--workdir",
                        str(tmp_path / "run"), "--groups", "2"], cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "- a, d\n- b, c" in run.stdout and "mean of 7 steps" in run.stdout
  assert (tmp_path / "run" / "grouping_2.md").read_text().strip() == run.stdout.strip()
  (tmp_path / "none").mkdir()
  bad = subprocess.run([sys.executable, "-m", "mtjax.cli", "group", "--workdir",
                        str(tmp_path / "none"), "--groups", "2"], cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "holds no inter-task affinity" in bad.stderr and "affinity_every" in bad.stderr


def test_conflict_fraction_counts_pairs_below_the_threshold():
  # Pairs (0, 1): cos -0.003 (a right angle to the eye), (0, 2): -0.3, (1, 2): 0.2.
  cos = jnp.array([[1.0, -0.003, -0.3], [-0.003, 1.0, 0.2], [-0.3, 0.2, 1.0]])
  assert relations.CONFLICT_THRESHOLD == -0.05
  assert float(relations.conflict_fraction(cos)) == pytest.approx(1 / 3)        # only (0, 2)
  assert float(relations.conflict_fraction(cos, 0.0)) == pytest.approx(2 / 3)   # PCGrad's cos < 0
  assert float(relations.conflict_fraction(cos, -0.5)) == 0.0
  got = relations.conflict_metrics(jnp.array([[1.0, -0.01], [-0.01, 1.0]]))
  assert float(got["conflict/fraction"]) == 0.0


def test_conflict_threshold_config():
  assert relations.conflict_threshold({}) == relations.CONFLICT_THRESHOLD
  assert relations.conflict_threshold({"conflict_threshold": 0}) == 0.0
  for bad in (0.1, -2, "low", True):
    with pytest.raises(ValueError, match="relations.conflict_threshold"):
      relations.conflict_threshold({"conflict_threshold": bad})
