"""IMTL-G, impartial multi-task learning (Liu et al., 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "imtl"


# --- contract checks shared by the weighting tests (same block in each test_<method>.py) ---

def _cases(d=16):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  a, b, c = (jax.random.normal(k, (d,)) for k in (k1, k2, k3))
  return {
      "conflicting": jnp.stack([a, -a + 0.1 * b]),
      "one_100x": jnp.stack([a, 100.0 * b]),
      "identical": jnp.stack([a, a, a]),
      "zero_one": jnp.stack([a, jnp.zeros(d), c]),
      "all_zero": jnp.zeros((3, d)),
      "single": a[None],
      "tiny": 1e-20 * jnp.stack([a, b]),
  }


def _decay(i, num_tasks):
  return jnp.exp(-0.1 * i * jnp.arange(1, num_tasks + 1) ** 2 / num_tasks ** 2)


def _run(method, grads, losses, calls=3, jit=False):
  """``calls`` updates on fixed gradients, the losses shrinking at task-dependent rates."""
  grads_like = jax.tree_util.tree_map(lambda x: jnp.zeros_like(x[0]), grads)
  num = jax.tree_util.tree_leaves(grads)[0].shape[0]
  state = method.init(num, grads_like=grads_like)
  update = jax.jit(method.update) if jit else method.update
  for i in range(calls):
    out = update(grads, state, losses=losses * _decay(i, num), key=jax.random.fold_in(KEY, i))
    combined, state, weights = out
  return combined, state, weights


def _check_adversarial(method):
  for name, grads in _cases().items():
    losses = jnp.linspace(1.0, 2.0, grads.shape[0])
    combined, state, weights = _run(method, grads, losses, jit=True)
    assert combined.shape == grads.shape[1:], name
    assert bool(jnp.all(jnp.isfinite(combined))), name
    assert weights.shape == (grads.shape[0],) and weights.dtype == jnp.float32, name
    for leaf in jax.tree_util.tree_leaves(state):
      assert bool(jnp.all(jnp.isfinite(leaf))), name
    if bool(jnp.all(jnp.isfinite(weights))):  # NaN weights: not a weighting (allowed)
      scale = float(jnp.max(jnp.abs(weights))) * float(jnp.max(jnp.abs(grads)))
      np.testing.assert_allclose(combined, weights @ grads, rtol=1e-4, atol=1e-5 * scale + 1e-30,
                                 err_msg=name)


def _check_jit_vmap(method, batch=4, num_tasks=3, dim=20):
  grads = jax.random.normal(jax.random.PRNGKey(2), (batch, num_tasks, dim))
  losses = jax.random.uniform(jax.random.PRNGKey(3), (batch, num_tasks), minval=0.5, maxval=2)
  eager = _run(method, grads[0], losses[0])  # eager dispatch is slow: one problem
  jitted = [_run(method, grads[i], losses[i], jit=True) for i in range(batch)]
  np.testing.assert_allclose(eager[0], jitted[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eager[2], jitted[0][2], rtol=1e-5, atol=1e-6)
  state = jax.vmap(lambda g: method.init(num_tasks, grads_like=g[0]))(grads)
  step = jax.jit(jax.vmap(lambda g, s, loss, k: method.update(g, s, losses=loss, key=k)))
  for i in range(3):
    keys = jnp.stack([jax.random.fold_in(KEY, i)] * batch)
    combined, state, weights = step(grads, state, losses * _decay(i, num_tasks), keys)
  for i in range(batch):
    np.testing.assert_allclose(combined[i], jitted[i][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights[i], jitted[i][2], rtol=1e-5, atol=1e-6)


def _check_pytree(method, num_tasks=3):
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  tree = {"a": jax.random.normal(k1, (num_tasks, 4, 5)),
          "b": jax.random.normal(k2, (num_tasks, 7))}
  flat = jnp.concatenate([tree["a"].reshape(num_tasks, -1), tree["b"]], axis=1)
  losses = jnp.linspace(0.5, 1.5, num_tasks)
  c_tree, _, w_tree = _run(method, tree, losses)
  c_flat, _, w_flat = _run(method, flat, losses)
  joined = jnp.concatenate([c_tree["a"].reshape(-1), c_tree["b"]])
  np.testing.assert_allclose(joined, c_flat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_tree, w_flat, rtol=1e-5, atol=1e-6)


def test_adversarial_inputs_stay_finite():
  _check_adversarial(weighting.get(NAME))


def test_jit_and_vmap_agree_with_eager():
  _check_jit_vmap(weighting.get(NAME))


def test_pytree_matches_flat_matrix():
  _check_pytree(weighting.get(NAME))


# --- method-specific properties ---

_UPDATE = jax.jit(weighting.get(NAME).update)


def _projections(direction, grads):
  unit = grads / jnp.linalg.norm(grads, axis=1, keepdims=True)
  return unit @ direction


def _paper_alpha(grads):
  """The closed form of Liu et al. (2021), in float64 numpy: α_{2:T} = g_1 U^T (D U^T)^{-1}."""
  g = np.asarray(grads, np.float64)
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  d_mat, u_mat = g[:1] - g[1:], u[:1] - u[1:]
  rest = g[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.concatenate([[1 - rest.sum()], rest])


@pytest.mark.parametrize("seed", range(5))
def test_equal_projections_on_every_unit_gradient(seed):
  grads = jax.random.normal(jax.random.PRNGKey(seed), (3, 50))
  grads = grads * jnp.array([[0.1], [1.0], [10.0]])  # unequal scales
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  proj = _projections(combined, grads)
  # Tolerance: float32 solve of a well-conditioned 3x3 cosine system.
  np.testing.assert_allclose(proj, jnp.full(3, jnp.mean(proj)), rtol=1e-4)
  np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-5)
  np.testing.assert_allclose(w, _paper_alpha(grads), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-5)


def test_identical_gradients_give_the_mean():
  g = jax.random.normal(KEY, (40,))
  grads = jnp.stack([g, g, g, g])
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(4), losses=jnp.ones(4), key=KEY)
  np.testing.assert_allclose(w, jnp.full(4, 0.25), rtol=1e-4)
  np.testing.assert_allclose(combined, g, rtol=1e-4, atol=1e-6)


def test_zero_gradient_is_finite_and_ignored():
  k1, k2 = jax.random.split(KEY)
  a, b = jax.random.normal(k1, (30,)), jax.random.normal(k2, (30,))
  grads = jnp.stack([a, jnp.zeros(30), b])
  combined, _, w = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  assert bool(jnp.all(jnp.isfinite(w)) & jnp.all(jnp.isfinite(combined)))
  assert float(w[1]) == 0.0
  proj = _projections(combined, grads[jnp.array([0, 2])])
  np.testing.assert_allclose(proj[0], proj[1], rtol=1e-4)
  # All zero: uniform weights, zero direction.
  _, _, w0 = _UPDATE(jnp.zeros((3, 5)), weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w0, jnp.full(3, 1 / 3), rtol=1e-6)


def test_single_task_and_global_scale():
  g = jax.random.normal(KEY, (1, 9))
  combined, _, w = _UPDATE(g, weighting.get(NAME).init(1), losses=jnp.ones(1), key=KEY)
  np.testing.assert_allclose(w, [1.0], rtol=1e-6)
  np.testing.assert_allclose(combined, g[0], rtol=1e-6)
  grads = jax.random.normal(jax.random.PRNGKey(9), (3, 20))
  _, _, w1 = _UPDATE(grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  _, _, w2 = _UPDATE(1e4 * grads, weighting.get(NAME).init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w1, w2, rtol=1e-4)


def test_conflicting_gradients_two_tasks():
  # For T = 2 the projections are equal iff the direction bisects the two unit gradients.
  grads = jnp.array([[1.0, 0.0], [-3.0, 1.0]])
  combined, _, _ = _UPDATE(grads, weighting.get(NAME).init(2), losses=jnp.ones(2), key=KEY)
  proj = _projections(combined, grads)
  np.testing.assert_allclose(proj[0], proj[1], rtol=1e-5)
