"""The model/task/optimizer contracts: feature pytrees, the general path, parameter groups,
loss parts and host-side evaluators."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import tasks as tasks_lib
from mtjax import weighting
from mtjax.models import labels
from mtjax.tasks.base import Evaluator, Task
from mtjax.train import loop, setup
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from tests.helpers import restore_latest, tiny_config

RNG = np.random.default_rng(0)


def _regression_task(name, parts=False):
  def loss_fn(out, batch):
    loss = jnp.mean((out - batch[name]) ** 2)
    return (loss, {"half": 0.5 * loss, "max": jnp.max(jnp.abs(out - batch[name]))}) if parts \
        else loss
  return Task(name, None, loss_fn,
              metrics_fn=lambda out, batch: {"mse": (jnp.sum((out - batch[name]) ** 2),
                                                     jnp.float32(out.shape[0]))},
              predict_fn=lambda out: out,
              label_spec=lambda size: {name: ((), jnp.float32)},
              higher_is_better={"mse": False})


class TwoLeafFeatures(nn.Module):
  """A shared encoder whose features are a dict of two arrays; one linear head per task."""

  task_names: tuple = ("a", "b")

  def setup(self):
    self.left = nn.Dense(4)
    self.right = nn.Dense(3)
    self.heads = {t: nn.Dense(1) for t in self.task_names}

  def encode(self, images, train=False):
    x = images.reshape(images.shape[0], -1)
    return {"left": jnp.tanh(self.left(x)), "right": jnp.sin(self.right(x))}

  def decode(self, features, task, output_size, train=False):
    both = jnp.concatenate([features["left"], features["right"] ** 2], axis=-1)
    return self.heads[task](both)[:, 0]

  def __call__(self, images, train=False):
    features = self.encode(images, train)
    return {"features": features,
            **{t: self.decode(features, t, None, train) for t in self.task_names}}

  def param_label(self, path):
    if path[0] in ("left", "right"):
      return f"shared/{path[0]}"
    return path[0].removeprefix("heads_")


class NoSharedEncoder(nn.Module):
  """Cross-stitch in miniature: one column per task, mixed by a shared 2×2 unit."""

  @nn.compact
  def __call__(self, images, train=False):
    x = images.reshape(images.shape[0], -1)
    a, b = nn.Dense(4, name="column_a")(x), nn.Dense(4, name="column_b")(x)
    alpha = self.param("stitch", lambda key: jnp.array([[0.9, 0.3], [0.2, 0.8]]))
    a, b = alpha[0, 0] * a + alpha[0, 1] * b, alpha[1, 0] * a + alpha[1, 1] * b
    return {"a": nn.Dense(1, name="head_a")(jnp.tanh(a))[:, 0],
            "b": nn.Dense(1, name="head_b")(jnp.tanh(b))[:, 0]}

  def param_label(self, path):
    return "shared" if path[0] == "stitch" else path[0][-1]


def _data(n=6):
  return {"image": jnp.asarray(RNG.normal(size=(n, 2, 2, 3)), jnp.float32),
          "a": jnp.asarray(RNG.normal(size=n), jnp.float32),
          "b": jnp.asarray(RNG.normal(size=n), jnp.float32)}


def _loss_vector(model, tasks, params, batch):
  out = model.apply({"params": params}, batch["image"])
  return jnp.stack([tasks[t].loss_fn(out[t], batch) for t in tasks])


def _close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_feature_pytree_per_task_gradients_match_jacrev():
  model, batch = TwoLeafFeatures(), _data()
  tasks = {"a": _regression_task("a"), "b": _regression_task("b")}
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  own = labels.split(model, params)
  assert sorted(own) == ["a", "b", "shared"]
  assert labels.groups(model, params) == ["a", "b", "shared/left", "shared/right"]

  # Parameter level: the Jacobian of the loss vector with respect to the shared parameters.
  expected = jax.jacrev(lambda shared: _loss_vector(
      model, tasks, labels.merge(shared, own["a"], own["b"]), batch))(own["shared"])
  got, finish = step_lib.task_terms(model, tasks, params, {}, batch).per_task()
  _close(got, expected)
  full = finish(jax.tree_util.tree_map(lambda g: g[0], got))
  summed = jax.grad(lambda p: jnp.sum(_loss_vector(model, tasks, p, batch)))(params)
  for task in ("a", "b"):  # each task's own parameters get the gradient of the summed loss
    _close(labels.split(model, full)[task], labels.split(model, summed)[task])
  _close(labels.split(model, full)["shared"], jax.tree_util.tree_map(lambda g: g[0], got))

  # Representation level: the Jacobian with respect to both feature leaves.
  features = model.apply({"params": params}, batch["image"], method="encode")

  def from_features(f):
    return jnp.stack([tasks[t].loss_fn(model.apply({"params": params}, f, t, None,
                                                   method="decode"), batch) for t in tasks])
  expected = jax.jacrev(from_features)(features)
  got, _ = step_lib.task_terms(model, tasks, params, {}, batch,
                               grad_level="representation").per_task()
  assert set(got) == {"left", "right"}
  _close(got, expected)

  # combine(w) is the gradient of Σ w_t L_t.
  w = jnp.array([0.3, 1.7])
  _close(step_lib.task_terms(model, tasks, params, {}, batch).combine(w),
         jax.grad(lambda p: jnp.sum(w * _loss_vector(model, tasks, p, batch)))(params))


@pytest.mark.parametrize("grad_level", ["parameter", "representation"])
def test_feature_pytree_model_trains_with_a_gram_method(grad_level):
  model, batch = TwoLeafFeatures(), _data(8)
  tasks = {"a": _regression_task("a"), "b": _regression_task("b")}
  trainer = make_trainer(model, tasks, weighting.get("mgda"), optax.sgd(0.05),
                         image_shape=(2, 2, 3), batch_size=8, grad_level=grad_level,
                         mesh=step_lib.make_mesh(jax.devices()[:2]))
  state = trainer.init(jax.random.PRNGKey(1))
  first = None
  for _ in range(30):
    state, metrics = trainer.step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.8 * first
  weights = np.array([metrics["weight/a"], metrics["weight/b"]])
  assert np.all(weights >= 0) and np.isclose(weights.sum(), 1.0, atol=1e-5)


def test_general_path_without_a_shared_encoder_matches_jacrev():
  model, batch = NoSharedEncoder(), _data()
  tasks = {"a": _regression_task("a"), "b": _regression_task("b")}
  params = model.init(jax.random.PRNGKey(0), batch["image"])["params"]
  own = labels.split(model, params)
  expected = jax.jacrev(lambda shared: _loss_vector(
      model, tasks, labels.merge(shared, own["a"], own["b"]), batch))(own["shared"])
  terms = step_lib.task_terms(model, tasks, params, {}, batch)
  got, finish = terms.per_task()
  _close(got, expected)
  assert float(jnp.abs(got["stitch"][0]).sum()) > 0 and float(jnp.abs(got["stitch"][1]).sum()) > 0
  summed = jax.grad(lambda p: jnp.sum(_loss_vector(model, tasks, p, batch)))(params)
  full = finish(jax.tree_util.tree_map(lambda g: jnp.sum(g, 0), got))
  _close(full, summed)
  w = jnp.array([2.0, 0.5])
  _close(terms.combine(w),
         jax.grad(lambda p: jnp.sum(w * _loss_vector(model, tasks, p, batch)))(params))
  # It trains with a gradient method at the parameter level ...
  trainer = make_trainer(model, tasks, weighting.get("pcgrad"), optax.sgd(0.05),
                         image_shape=(2, 2, 3), batch_size=6,
                         mesh=step_lib.make_mesh(jax.devices()[:2]))
  state, metrics = trainer.step(trainer.init(jax.random.PRNGKey(0)), batch)
  assert np.isfinite(float(metrics["loss"]))
  # ... and refuses the representation level, saying why.
  with pytest.raises(ValueError, match="grad_level: 'representation'.*no shared encoder"):
    make_trainer(model, tasks, weighting.get("mgda"), optax.sgd(0.1), image_shape=(2, 2, 3),
                 batch_size=6, grad_level="representation")


def test_frozen_group_is_not_differentiated():
  model, batch = TwoLeafFeatures(), _data(8)
  tasks = {"a": _regression_task("a"), "b": _regression_task("b")}
  seen = {}

  def spy(task_grads, state, *, losses, key=None):
    jax.debug.callback(lambda grads: seen.update(grads=grads), task_grads)  # the values
    return weighting.get("mgda").update(task_grads, state, losses=losses, key=key)

  method = weighting.Method(weighting.get("mgda").init, spy, "gradient")
  trainer = make_trainer(model, tasks, method, optax.sgd(0.1), image_shape=(2, 2, 3),
                         batch_size=8, frozen=("shared/left",), donate=False,
                         mesh=step_lib.make_mesh(jax.devices()[:1]))
  state = trainer.init(jax.random.PRNGKey(0))
  new, _ = jax.block_until_ready(trainer.step(state, batch))
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree_util.tree_leaves(
      seen["grads"]["left"]))
  assert float(jnp.abs(seen["grads"]["right"]["kernel"]).sum()) > 0.0
  assert _leaves_equal(new.params["left"], state.params["left"])
  assert not _leaves_equal(new.params["right"], state.params["right"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _restore(workdir):
  return restore_latest(workdir)[1]


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb, strict=True))


def test_frozen_group_stays_bitwise_and_its_optimizer_state_resumes(data_dir, tmp_path):
  cfg = tiny_config(data_dir, **{"optimizer.frozen": ("shared/stem",),
                                 "optimizer.lr_scale": (("depth", 0.5),)})
  exp = setup.build(cfg)
  initial = jax.device_get(setup.make_trainer(cfg, exp, step_lib.make_mesh()).init(
      jax.random.PRNGKey(cfg.seed)))
  loop.train(cfg, str(tmp_path / "full"), progress=False)
  loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_after=3)
  loop.train(cfg, str(tmp_path / "cut"), progress=False)
  full, cut = _restore(tmp_path / "full"), _restore(tmp_path / "cut")
  assert _leaves_equal(full, cut)  # params, optimizer state (every group), everything
  stem = {k: v for k, v in initial.params["backbone"].items() if k.endswith("_0")
          and "Block" not in k}
  assert stem and _leaves_equal(stem, {k: full["params"]["backbone"][k] for k in stem})
  moved = full["params"]["backbone"]["BasicBlock_0"]
  assert not _leaves_equal(moved, initial.params["backbone"]["BasicBlock_0"])
  assert not _leaves_equal(full["params"]["heads_depth"], initial.params["heads_depth"])


def test_bad_group_names_fail_early(data_dir, tmp_path):
  cfg = tiny_config(data_dir, **{"optimizer.frozen": ("shared/stage9",)})
  with pytest.raises(ValueError, match=r"config.optimizer.frozen: 'shared/stage9' matches no "
                                       r"parameter group.*'shared/stem'"):
    loop.train(cfg, str(tmp_path), progress=False)


def test_lr_scale_scales_the_update():
  from mtjax.train import optim
  model = TwoLeafFeatures()
  params = model.init(jax.random.PRNGKey(0), _data()["image"])["params"]
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  base = dict(name="sgd", learning_rate=0.1, schedule="constant", warmup_steps=0, momentum=0.0,
              weight_decay=0.0, grad_clip=0.0)
  plain = optim.make_optimizer(optim.OptimizerSpec(**base), 10)
  grouped = optim.make_optimizer(optim.OptimizerSpec(**base, lr_scale=(("shared", 0.5),),
                                                     frozen=("b",)), 10,
                                 lambda p: labels.label_tree(model, p))
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_group, _ = grouped.update(grads, grouped.init(params), params)
  _close(u_group["left"], jax.tree_util.tree_map(lambda u: 0.5 * u, u_plain["left"]))
  _close(u_group["heads_a"], u_plain["heads_a"])
  assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree_util.tree_leaves(u_group["heads_b"]))


def _depth_with_parts_and_evaluator():
  """The real depth task, with a loss made of parts and a host-side exact median error."""
  depth = tasks_lib.get("depth")

  def loss_fn(output, batch):
    loss = depth.loss_fn(output, batch)
    return loss, {"l1": loss, "double": 2.0 * loss}

  def update(state, prediction, batch):
    keep = np.asarray(batch["mask"]) > 0
    err = np.abs(prediction - batch["depth"])[keep][np.asarray(batch["depth_valid"])[keep]]
    return {"errors": state["errors"] + [err], "examples": state["examples"] + int(keep.sum())}

  def result(state):
    return {"median_abs_err": float(np.median(np.concatenate(state["errors"]))),
            "examples_seen": float(state["examples"])}

  evaluator = Evaluator(lambda: {"errors": [], "examples": 0}, update, result)
  return lambda: depth._replace(loss_fn=loss_fn, evaluator=evaluator)


def test_loss_parts_are_logged_and_host_evaluator_runs_in_eval(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(tasks_lib._REGISTRY, "depth", _depth_with_parts_and_evaluator())
  cfg = tiny_config(data_dir, eval_batch_size=16)  # 8 validation examples + 8 padded
  loop.train(cfg, str(tmp_path), progress=False)
  with open(tmp_path / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  for record in train:
    np.testing.assert_allclose(record["loss/depth/l1"], record["loss/depth"], rtol=1e-6)
    np.testing.assert_allclose(record["loss/depth/double"], 2 * record["loss/depth"], rtol=1e-6)
  out = loop.evaluate(cfg, str(tmp_path))
  for split in ("validation", "test"):
    got = out[split]["metrics"]["depth"]
    assert got["examples_seen"] == 8.0  # the padded examples were masked out
    assert 0.0 < got["median_abs_err"] < got["abs_err"] * 3
    assert np.isfinite(got["abs_err"])
