"""FORUM (Ye et al. 2024): the first-order value-function information (float64 on a linear
model), the constrained aggregation QP (against a grid search), the update on hand-computed
steps, and the model gradient the meta step assembles from its MetaDirection."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting
from mtjax.train import meta as meta_lib
from mtjax.train.step import task_terms
from mtjax.weighting.base import ValueFunctionInfo
from mtjax.weighting.meta import forum_qp
from tests.weighting import linear_meta

NAME = "forum"


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _qp_grid(m, pi, c, points=200001):
  """float64, T = 2: u = (a, 1 − a) on a fine grid, the last weight in closed form."""
  a = np.linspace(0.0, 1.0, points)
  u = np.stack([a, 1 - a], axis=1)
  b, d = m[:2, 2], m[2, 2] + 1e-8
  s = np.maximum(np.maximum(u @ pi, 0.0), (c - 2 * u @ b) / (2 * d))
  f = np.einsum("ni,ij,nj->n", u, m[:2, :2], u) + 2 * s * (u @ b) + d * s * s - c * s
  i = np.argmin(f)
  return np.r_[u[i], s[i]], f[i]


def _objective(m, c, w):
  m = m + np.diag([0.0, 0.0, 1e-8])
  return w @ m @ w - c * w[-1]


def test_value_function_information_matches_float64():
  p = linear_meta.problem(seed=5)
  method = weighting.get(NAME, inner_steps=3, inner_lr=0.2)
  logits = np.array([0.3, -0.5])
  state = linear_meta.state_of(p, method.init(2)._replace(logits=jnp.asarray(logits)))

  def info_of(state):
    terms = task_terms(p.model, p.tasks, state.params, {}, p.batch)
    return meta_lib.value_function_info(p.model, p.tasks, state, terms, p.batch, p.meta_batch,
                                         None, method.meta)[0]

  info = jax.jit(info_of)(state)
  theta, s = linear_meta.theta(p), _softmax(logits)
  inner = sum(w * g for w, g in zip(s, linear_meta.grads(p.batch, theta), strict=True))
  th = theta
  for _ in range(3):
    th = th - 0.2 * sum(w * g for w, g in zip(s, linear_meta.grads(p.batch, th), strict=True))
  meta = linear_meta.grads(p.meta_batch, theta)
  np.testing.assert_allclose(info.losses, linear_meta.losses(p.batch, theta), rtol=1e-5)
  np.testing.assert_allclose(info.inner_losses, linear_meta.losses(p.batch, th), rtol=1e-5)
  np.testing.assert_allclose(info.meta_gram, [[np.sum(a * b) for b in meta] for a in meta],
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(info.cross, [np.sum(g * inner) for g in meta], rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(info.inner_sq, np.sum(inner * inner), rtol=1e-4)


def test_qp_matches_a_grid_search():
  rng = np.random.default_rng(0)
  qp = jax.jit(forum_qp)
  for trial in range(6):
    vecs = rng.normal(size=(3, 4)) * rng.uniform(0.1, 3.0, size=(3, 1))
    m = vecs @ vecs.T
    pi = rng.normal(size=2)
    c = rng.uniform(0.0, 2.0) * m[2, 2]
    expected, best = _qp_grid(m, pi, c)
    got = np.asarray(qp(jnp.asarray(m, jnp.float32), jnp.asarray(pi, jnp.float32),
                              jnp.float32(c)), np.float64)
    assert got[:2].min() >= 0 and abs(got[:2].sum() - 1) < 1e-5, trial
    assert got[2] >= max(pi @ got[:2], 0.0) - 1e-5, trial
    scale = np.abs(m).max()
    assert _objective(m, c, got) <= best + 1e-4 * scale, trial
    np.testing.assert_allclose(got, expected, atol=5e-3 * max(1.0, np.abs(expected).max()),
                               err_msg=str(trial))


def test_update_on_hand_computed_steps():
  phi, lr = 0.1, 0.01
  method = weighting.get(NAME, outer_lr=lr, phi=phi)
  state = method.init(2)
  info = ValueFunctionInfo(losses=jnp.array([1.0, 2.0]), inner_losses=jnp.array([0.7, 1.9]),
                           meta_gram=jnp.array([[4.0, -1.0], [-1.0, 1.0]]),
                           cross=jnp.array([1.5, -0.4]), inner_sq=jnp.float32(2.0))
  lam = np.zeros(2)
  logits = np.full(2, 0.5)
  for k in range(2):  # the second step reuses the information: the EMA with β = 2^(-3/4)
    s = _softmax(logits)
    gap = np.array([0.3, 0.1])
    alpha_gap = s * gap - s * (s @ gap)  # ∇_α softmax(α)·gap
    norms = np.array([2.0, 1.0])
    gf_gq = np.array([1.5, -0.4]) / norms
    gq_sq = alpha_gap @ alpha_gap + 2.0
    pi = phi - gf_gq / (gq_sq + 1e-8)
    c = phi * (gq_sq + 1e-8)
    m = np.array([[1.0, -0.5, gf_gq[0]], [-0.5, 1.0, gf_gq[1]], [gf_gq[0], gf_gq[1], gq_sq]])
    w, _ = _qp_grid(m, pi, c)
    lam = lam + (k + 1) ** -0.75 * (w[:2] - lam)
    nu = max(lam @ pi, 0.0)
    direction, state, weights = jax.jit(method.update)(info, state, losses=info.losses,
                                                       key=None)
    np.testing.assert_allclose(state.lam, lam, atol=5e-3)
    np.testing.assert_allclose(direction.train, nu * s, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(direction.meta, lam / norms, atol=5e-3)
    if k == 0:  # Adam's first step: lr · sign(g)
      np.testing.assert_allclose(state.logits, logits - lr * np.sign(nu * alpha_gap), rtol=1e-5)
    np.testing.assert_allclose(weights, _softmax(np.asarray(state.logits)), rtol=1e-5)
    logits = np.asarray(state.logits, np.float64)


def test_meta_step_assembles_the_model_gradient():
  """grads = Σ_t train_t ∇L_t(train batch) + Σ_t meta_t ∇L_t(meta batch) of the direction."""
  p = linear_meta.problem(seed=6)
  method = weighting.get(NAME, inner_steps=2)
  state = linear_meta.state_of(p, method.init(2))

  def run(state):
    terms = task_terms(p.model, p.tasks, state.params, {}, p.batch)
    info, _ = meta_lib.value_function_info(p.model, p.tasks, state, terms, p.batch,
                                           p.meta_batch, None, method.meta)
    direction = method.update(info, state.weighting_state, losses=terms.losses, key=None)[0]
    grads, wstate, weights, metrics = meta_lib.meta_step(p.model, p.tasks, method, state, terms,
                                                         p.batch, p.meta_batch, None, None)
    return direction, grads, weights

  direction, grads, weights = jax.jit(run)(state)
  theta = linear_meta.theta(p)
  train, meta = linear_meta.grads(p.batch, theta), linear_meta.grads(p.meta_batch, theta)
  expected = sum(np.float64(direction.train[t]) * train[t] + np.float64(direction.meta[t])
                 * meta[t] for t in range(2))
  np.testing.assert_allclose(grads["Dense_0"]["kernel"], expected, rtol=1e-4, atol=1e-7)
  assert float(jnp.sum(direction.meta)) > 0 and np.all(np.isfinite(weights))
