"""MoDo's double sampling in the train step (Chen et al., 2023, Algorithm 1): the cross Gram
matrix of the two halves' task gradients against float64, the step's λ and update against
float64, equal halves reduce to one sample, one compile, and clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax import weighting
from mtjax.tasks.base import Task
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from tests.helpers import scenes, tiny_trainer
from tests.weighting import common

N, D, K = 8, 5, 3  # examples, inputs, features
NAMES = ("a", "b")


class LinearEncoder(nn.Module):
  """Features ``f = x A`` (shared), outputs ``out_t = f b_t`` (task ``t``'s own ``b_t``)."""

  def setup(self):
    self.enc = nn.Dense(K, use_bias=False)
    self.head_a = nn.Dense(1, use_bias=False)
    self.head_b = nn.Dense(1, use_bias=False)

  def encode(self, x, train=True):
    return self.enc(x)

  def decode(self, f, name, output_size=None, train=True):
    return {"a": self.head_a, "b": self.head_b}[name](f)[:, 0]

  def __call__(self, x, train=True):
    f = self.encode(x)
    return {"features": f, **{n: self.decode(f, n) for n in NAMES}}

  def param_label(self, path):
    return "shared" if path[0] == "enc" else path[0].removeprefix("head_")


def _sq_task(name):
  loss = lambda out, batch: 0.5 * jnp.mean((out - batch[name]) ** 2)  # noqa: E731
  return Task(name, None, loss, None, None, lambda size: {name: ((), jnp.float32)}, {})


TASKS = {n: _sq_task(n) for n in NAMES}


def _batch(seed, n=N):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, D)).astype(np.float32),
          **{k: rng.normal(size=n).astype(np.float32) for k in NAMES}}


def _params(seed=0):
  return LinearEncoder().init(jax.random.PRNGKey(seed), jnp.zeros((1, D)))["params"]


def _reference(params, batch):
  """float64 per-task gradients of one (half) batch: ``∂L_t/∂A`` (D, K), the feature cotangents
  ``∂L_t/∂f`` (n, K) and ``∂L_t/∂b_t`` (K,)."""
  a = np.asarray(params["enc"]["kernel"], np.float64)
  x = np.asarray(batch["image"], np.float64)
  f = x @ a
  out = {}
  for name in NAMES:
    b = np.asarray(params[f"head_{name}"]["kernel"], np.float64)[:, 0]
    r = (f @ b - np.asarray(batch[name], np.float64)) / x.shape[0]
    cot = np.outer(r, b)
    out[name] = (x.T @ cot, cot, f.T @ r)
  return out


def _cross64(params, batch, level):
  half1 = {k: v[0::2] for k, v in batch.items()}
  half2 = {k: v[1::2] for k, v in batch.items()}
  g1, g2 = _reference(params, half1), _reference(params, half2)
  i = 0 if level == "parameter" else 1
  c = np.array([[np.sum(g1[p][i] * g2[q][i]) for q in NAMES] for p in NAMES])
  return c if level == "parameter" else 0.5 * c


def _gram64(params, batch, level):
  g = _reference(params, batch)
  i = 0 if level == "parameter" else 1
  return np.array([[np.sum(g[p][i] * g[q][i]) for q in NAMES] for p in NAMES])


@jax.jit
def _grams(params, batch):
  model = LinearEncoder()
  out = {}
  for level in step_lib.GRAD_LEVELS:
    out[f"cross/{level}"] = step_lib.cross_gram(model, TASKS, params, {}, batch, grad_level=level)
    grads, _ = step_lib.task_terms(model, TASKS, params, {}, batch, grad_level=level).per_task()
    out[f"gram/{level}"] = weighting.gram(grads)
  return out


def test_cross_gram_matches_float64_and_equal_halves_give_the_gram():
  params = _params()
  batch = _batch(1)
  twice = {k: np.repeat(v[:N // 2], 2, axis=0) for k, v in batch.items()}  # halves equal
  got, same = _grams(params, batch), _grams(params, twice)
  for level in step_lib.GRAD_LEVELS:
    expected = _cross64(params, batch, level)
    assert not np.allclose(expected, expected.T)  # a real cross product: not symmetric
    np.testing.assert_allclose(got[f"cross/{level}"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[f"gram/{level}"], _gram64(params, batch, level), rtol=1e-5,
                               atol=1e-7)
    # Equal halves: the cross Gram matrix is the whole batch's Gram matrix.
    np.testing.assert_allclose(same[f"cross/{level}"], same[f"gram/{level}"], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(same[f"gram/{level}"], _gram64(params, twice, level), rtol=1e-5,
                               atol=1e-7)


def _compiles():
  names = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(kwargs.get("fun_name", ""))
  return names, listener


@pytest.mark.parametrize("level", step_lib.GRAD_LEVELS)
def test_step_moves_along_the_whole_batch_with_the_cross_gram_lambda(level):
  """Three steps of SGD under double-sampled MoDo against float64: λ from the halves' cross
  Gram matrix, the shared parameters along Σ_t λ_t ∇L_t of the whole batch, each head along its
  own ∇L_t; the step compiles once."""
  gamma, rho, lr = 0.5, 0.1, 0.1
  method = weighting.get("modo", gamma=gamma, rho=rho)
  assert method.double_sampling
  mesh = step_lib.make_mesh(jax.devices()[:2])
  trainer = make_trainer(LinearEncoder(), TASKS, method, optax.sgd(lr), image_shape=(D,),
                         batch_size=N, grad_level=level, mesh=mesh)
  state = step_lib.replicate(trainer.init(jax.random.PRNGKey(0)), mesh)
  params = jax.device_get(state.params)
  lam = np.full(2, 0.5)
  names, listener = _compiles()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for i in range(3):
      batch = _batch(10 + i)
      state, metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
      lam = common.project_simplex(lam - gamma * (_cross64(params, batch, level) @ lam + rho * lam))
      g = _reference(params, batch)
      params = jax.tree_util.tree_map(np.asarray, params)
      params["enc"]["kernel"] = params["enc"]["kernel"] - lr * sum(
          w * g[n][0] for w, n in zip(lam, NAMES, strict=True))
      for n in NAMES:
        params[f"head_{n}"]["kernel"] = params[f"head_{n}"]["kernel"] - lr * g[n][2][:, None]
      np.testing.assert_allclose(state.weighting_state.weights, lam, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose([metrics["weight/a"], metrics["weight/b"]], lam, rtol=1e-5,
                                 atol=1e-6)
      for x, y in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params),
                      strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert names.count("jit(step)") == 1, names


def test_equal_halves_give_single_sample_modo_on_a_batchnorm_model():
  """The tiny ResNet (batch norm: a half's statistics are the batch's when the halves are
  equal), two devices, the representation level: double-sampled MoDo = single-sample MoDo."""
  batch = {k: np.repeat(v, 2, axis=0) for k, v in scenes(2, size=16).items()}
  out = []
  for double in (False, True):
    method = weighting.get("modo", gamma=0.5, double_sampling=double)
    trainer, state, mesh = tiny_trainer(method, "representation", jax.devices()[:2],
                                        ("segmentation", "depth", "normals"), batch=4, size=16)
    for _ in range(2):
      state, metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
    out.append(jax.device_get((state.params, state.weighting_state, metrics)))
  assert not np.allclose(out[1][1].weights, 1 / 3)  # λ moved
  for x, y in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1]),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=6), r"batch_size: got 6 on 2 device\(s\) \(3 per device\).*multiple of 4"),
    (dict(batch_size=8, task_chunk=1), r"task_chunk: got 1.*double_sampling=True"),
])
def test_double_sampling_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_trainer(LinearEncoder(), TASKS, weighting.get("modo"), optax.sgd(0.1),
                 image_shape=(D,), mesh=step_lib.make_mesh(jax.devices()[:2]), **kwargs)
  # Single sampling takes any batch.
  make_trainer(LinearEncoder(), TASKS, weighting.get("modo", double_sampling=False),
               optax.sgd(0.1), image_shape=(D,), batch_size=6,
               mesh=step_lib.make_mesh(jax.devices()[:2]))
