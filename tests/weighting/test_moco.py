"""MoCo (Fernando et al., 2023): tracking y -> gradients, λ -> MGDA min-norm weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import common


def _mgda_weights(grads, iters=20000):
  """min_{λ ∈ Δ} |Σ_t λ_t g_t|², by projected gradient descent in float64."""
  m = grads @ grads.T
  lam = np.full(len(m), 1.0 / len(m))
  step = 1.0 / np.linalg.eigvalsh(m).max()
  for _ in range(iters):
    lam = common.project_simplex(lam - step * m @ lam)
  return lam


@functools.cache
def _scan(method, steps):
  def run(x, losses):
    def step(state, _):
      combined, state, weights = method.update(x, state, losses=losses, key=None)
      return state, (combined, weights)
    return jax.lax.scan(step, method.init(x.shape[0], x[0]), None, length=steps)
  return jax.jit(run)


def _run(method, x, losses, steps):
  """``steps`` updates with the same gradients; returns the final state and the last output."""
  x = jnp.asarray(x, jnp.float32)
  state, (combined, weights) = _scan(method, steps)(x, jnp.asarray(losses, jnp.float32))
  return state, combined[-1], weights[-1]


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
def test_constant_gradients_converge_to_mgda(num_tasks):
  rng = np.random.default_rng(num_tasks)
  x = rng.normal(size=(num_tasks, 10)) / np.sqrt(10)
  x[0] += 0.5  # a common component: the min-norm point is not a vertex
  expected = _mgda_weights(x)
  # A constant λ step size: linear convergence to the min-norm weights.
  method = weighting.get("moco", normalize=False, gamma=0.5, gamma_sigma=0.0)
  state, combined, weights = _run(method, x, np.ones(num_tasks), 1000)
  np.testing.assert_allclose(state.y, x, atol=1e-5)
  np.testing.assert_allclose(state.lambd, expected, atol=2e-4)
  np.testing.assert_allclose(weights, state.lambd)
  np.testing.assert_allclose(combined, expected @ x, atol=1e-4)
  assert int(state.step) == 1000
  # The default decaying step size (γ_t = 0.1 / sqrt(t)) gets there more slowly.
  state, combined, _ = _run(weighting.get("moco", normalize=False), x, np.ones(num_tasks), 1000)
  np.testing.assert_allclose(state.y, x, atol=1e-5)
  np.testing.assert_allclose(state.lambd, expected, atol=2e-2)
  np.testing.assert_allclose(np.linalg.norm(combined), np.linalg.norm(expected @ x), rtol=1e-2)


def test_normalized_tracking_and_first_step_closed_form():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8)) * np.array([[0.1], [1.0], [30.0]])
  losses = np.array([0.5, 2.0, 1.0])
  unit_scaled = losses[:, None] * x / np.linalg.norm(x, axis=1, keepdims=True)
  # Default: h_t = L_t g_t / |g_t| (LibMTL); y tracks it.
  state, _, _ = _run(weighting.get("moco"), x, losses, 300)
  np.testing.assert_allclose(state.y, unit_scaled, rtol=1e-4, atol=1e-5)
  # One step from the initial state: y = β h, λ = Π_Δ(1/T - γ y y^T 1/T), combined = y^T λ.
  for lambda_update in ("projection", "softmax"):
    method = weighting.get("moco", lambda_update=lambda_update)
    state, combined, weights = _run(method, x, losses, 1)
    y = 0.5 * unit_scaled
    lam = np.full(3, 1 / 3) - 0.1 * (y @ y.T) @ np.full(3, 1 / 3)
    if lambda_update == "projection":
      lam = common.project_simplex(lam)
    else:
      lam = np.exp(lam) / np.exp(lam).sum()
    np.testing.assert_allclose(state.y, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, lam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined, lam @ y, rtol=1e-5, atol=1e-6)
  # Second step uses the decayed rates β / 2^σ and γ / 2^σ.
  state, _, _ = _run(weighting.get("moco"), x, losses, 2)
  beta2 = 0.5 / np.sqrt(2.0)
  np.testing.assert_allclose(state.y, y + beta2 * (unit_scaled - y), rtol=1e-5, atol=1e-6)


def test_init_needs_grads_like_and_validates():
  method = weighting.get("moco")
  with pytest.raises(ValueError, match="grads_like"):
    method.init(3)
  with pytest.raises(ValueError, match="lambda_update"):
    weighting.get("moco", lambda_update="sparsemax")
  state = method.init(2, grads_like={"w": jnp.zeros((3, 4)), "b": jnp.zeros(5)})
  assert state.y["w"].shape == (2, 3, 4) and state.y["b"].shape == (2, 5)
  np.testing.assert_allclose(state.lambd, [0.5, 0.5])


def test_adversarial_inputs_stay_finite():
  rng = np.random.default_rng(1)
  g1, g2 = rng.normal(size=(2, 40))
  cases = common.pair_cases(g1, g2)
  for normalize in (True, False):
    method = weighting.get("moco", normalize=normalize)
    for name, x in cases.items():
      state, combined, weights = _run(method, x, np.ones(len(x)), 3)
      leaves = [combined, weights, state.y, state.lambd]
      assert all(np.all(np.isfinite(leaf)) for leaf in leaves), (normalize, name)
      np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-5)
  # Opposite gradients: MGDA's min-norm point is 0, MoCo heads there.
  state, combined, _ = _run(weighting.get("moco", normalize=False), cases["opposite"],
                            np.ones(2), 50)
  np.testing.assert_allclose(state.lambd, [0.5, 0.5], atol=1e-5)
  np.testing.assert_allclose(combined, 0.0, atol=1e-4)


def test_jit_vmap_and_pytree_agree():
  rng = np.random.default_rng(2)
  method = weighting.get("moco")
  xs = jnp.asarray(rng.normal(size=(4, 3, 20)), jnp.float32)
  losses = jnp.asarray(rng.uniform(0.5, 2.0, size=(4, 3)), jnp.float32)
  state = method.init(3, grads_like=xs[0, 0])
  _, state, _ = method.update(xs[1], state, losses=losses[1], key=None)  # a non-trivial state
  eager = method.update(xs[0], state, losses=losses[0], key=None)
  update = jax.jit(method.update)
  jitted = [update(x, state, losses=loss, key=None) for x, loss in zip(xs, losses, strict=True)]
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted[0]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda x, loss: method.update(x, state, losses=loss, key=None))(xs, losses)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched[2], np.stack([j[2] for j in jitted]), rtol=1e-5, atol=1e-6)
  # Pytree gradients with a pytree state give the same numbers as the flat matrix.
  def split(x):
    return {"a": x[..., :12].reshape(x.shape[:-1] + (3, 4)), "b": x[..., 12:]}
  tree_state = state._replace(y=split(state.y))
  tree_out = update(split(xs[0]), tree_state, losses=losses[0], key=None)
  flat = jnp.concatenate([tree_out[0]["a"].reshape(-1), tree_out[0]["b"]])
  np.testing.assert_allclose(flat, eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tree_out[2], eager[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tree_out[1].y["b"], eager[1].y[:, 12:], rtol=1e-5, atol=1e-6)
