"""GradVac (Wang et al., 2021): targets reached exactly, EMA of the targets, vector reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.weighting.base import gram
from mtjax.weighting.gradient_surgery import GradVacState, gradvac_coefficients, task_orders
from tests.weighting import common

_METHOD = weighting.get("gradvac")
_JIT_UPDATE = jax.jit(_METHOD.update)


def _update(x, key, state=None):
  x = jnp.asarray(x, jnp.float32)
  state = _METHOD.init(x.shape[0]) if state is None else state
  return _JIT_UPDATE(x, state, losses=jnp.ones(x.shape[0]), key=key)


def _cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def _reference(grads, targets, orders, beta, on_adjust_only):
  """Algorithm 1 written on vectors, in float64, visiting the tasks in ``orders``."""
  grads = np.asarray(grads, np.float64)
  targets = np.array(targets, np.float64)
  edited = grads.copy()
  for i in range(len(grads)):
    for j in np.asarray(orders[i]):
      if j == i:
        continue
      phi, target = _cos(edited[i], grads[j]), targets[i, j]
      adjusted = phi < target
      if adjusted:
        root, root_t = np.sqrt(1 - phi**2), np.sqrt(1 - target**2)
        w = (np.linalg.norm(edited[i]) * (target * root - phi * root_t)
             / (np.linalg.norm(grads[j]) * root_t))
        edited[i] = edited[i] + w * grads[j]
      if adjusted or not on_adjust_only:
        targets[i, j] = (1 - beta) * target + beta * phi
  return edited, targets


@jax.jit
@jax.vmap
def _edit(x, targets, key):
  orders = task_orders(key, x.shape[0])
  c, new_targets = gradvac_coefficients(gram(x), targets, orders, 0.5)
  c_libmtl, targets_libmtl = gradvac_coefficients(gram(x), targets, orders, 0.5, True)
  return c @ x, new_targets, c_libmtl @ x, targets_libmtl, orders


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_matches_vector_implementation(num_tasks):
  rng = np.random.default_rng(num_tasks)
  x = rng.normal(size=(6, num_tasks, 20)) * rng.uniform(0.1, 10.0, size=(6, num_tasks, 1))
  targets = rng.uniform(-0.5, 0.8, size=(6, num_tasks, num_tasks))
  keys = jax.random.split(jax.random.PRNGKey(num_tasks), 6)
  outs = _edit(jnp.asarray(x, jnp.float32), jnp.asarray(targets, jnp.float32), keys)
  adjusted = 0
  for b, (edited, new_t, edited_lib, new_t_lib, orders) in enumerate(zip(*outs, strict=True)):
    ref, ref_t = _reference(x[b], targets[b], orders, 0.5, on_adjust_only=False)
    np.testing.assert_allclose(edited, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(new_t, ref_t, rtol=1e-4, atol=1e-5)
    ref, ref_t = _reference(x[b], targets[b], orders, 0.5, on_adjust_only=True)
    np.testing.assert_allclose(edited_lib, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(new_t_lib, ref_t, rtol=1e-4, atol=1e-5)
    adjusted += int(np.abs(ref - x[b]).max() > 1e-3)
  assert adjusted >= 3  # the targets were above the similarities often enough to matter


def test_adjusted_gradient_reaches_its_target_cosine():
  rng = np.random.default_rng(0)
  g1, g2 = rng.normal(size=(2, 30))  # cosine near 0, below the target 0.5
  x = np.stack([g1, g2])
  state = GradVacState(targets=jnp.full((2, 2), 0.5, jnp.float32))
  combined, new_state, weights = _update(x, jax.random.PRNGKey(0), state)
  edited1 = g1 + (weights[1] - 1.0) * g2  # g_1' = g_1 + w_12 g_2
  edited2 = g2 + (weights[0] - 1.0) * g1
  np.testing.assert_allclose(_cos(edited1, g2), 0.5, atol=1e-4)
  np.testing.assert_allclose(_cos(edited2, g1), 0.5, atol=1e-4)
  np.testing.assert_allclose(combined, edited1 + edited2, rtol=1e-4, atol=1e-5)
  # The EMA moves halfway (β = 0.5) to the observed similarity.
  expected = 0.5 * 0.5 + 0.5 * _cos(g1, g2)
  np.testing.assert_allclose(new_state.targets[0, 1], expected, atol=1e-5)
  np.testing.assert_allclose(new_state.targets[1, 0], expected, atol=1e-5)


def test_first_step_is_pcgrad_and_targets_converge_to_similarity():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 20)), jnp.float32)
  key = jax.random.PRNGKey(5)
  pcgrad = weighting.get("pcgrad")
  expected = pcgrad.update(x, pcgrad.init(3), losses=jnp.ones(3), key=key)[0]
  np.testing.assert_allclose(_update(x, key)[0], expected, rtol=1e-5, atol=1e-5)
  # Two tasks, fixed gradients: φ̂ -> cos(g_1, g_2) and the update -> g_1 + g_2.
  x2 = jnp.asarray(np.stack([rng.normal(size=20), rng.normal(size=20)]), jnp.float32)

  def step(state, key):
    combined, state, _ = _METHOD.update(x2, state, losses=jnp.ones(2), key=key)
    return state, combined

  state, combined = jax.lax.scan(step, _METHOD.init(2), jax.random.split(key, 40))
  cos = _cos(np.asarray(x2[0]), np.asarray(x2[1]))
  np.testing.assert_allclose(state.targets[0, 1], cos, atol=1e-5)
  np.testing.assert_allclose(state.targets[1, 0], cos, atol=1e-5)
  np.testing.assert_allclose(combined[-1], x2.sum(0), rtol=1e-3, atol=1e-4)


def test_libmtl_ema_never_raises_targets():
  method = weighting.get("gradvac", ema_on_adjust_only=True)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 20)), jnp.float32)
  state = method.init(3)
  for seed in range(3):
    _, state, _ = method.update(x, state, losses=jnp.ones(3), key=jax.random.PRNGKey(seed))
  assert np.all(np.asarray(state.targets) <= 0.0)
  assert np.any(np.asarray(state.targets) < 0.0)


def test_adversarial_inputs_stay_finite():
  rng = np.random.default_rng(3)
  g1, g2 = rng.normal(size=(2, 40))
  key = jax.random.PRNGKey(0)
  high = GradVacState(targets=jnp.full((2, 2), 0.9, jnp.float32))
  cases = {"conflicting": np.stack([g1, -g1 + 0.1 * g2]), **common.pair_cases(g1, g2)}
  del cases["single"]  # the 2 x 2 ``high`` state is for two tasks; T = 1 is checked below
  for name, x in cases.items():
    for state in (None, high):
      combined, new_state, weights = _update(x, key, state)
      assert np.all(np.isfinite(combined)) and np.all(np.isfinite(weights)), name
      assert np.all(np.isfinite(new_state.targets)), name
  np.testing.assert_allclose(_update(cases["identical"], key, high)[0], 2 * g1, rtol=1e-5)
  np.testing.assert_allclose(_update(cases["zero"], key, high)[0], g1, rtol=1e-5)
  single = jnp.asarray(g1[None], jnp.float32)
  np.testing.assert_allclose(_update(single, key)[0], g1, rtol=1e-6)


def test_jit_vmap_and_pytree_agree():
  rng = np.random.default_rng(4)
  xs = jnp.asarray(rng.normal(size=(4, 3, 20)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  states = GradVacState(targets=jnp.asarray(rng.uniform(-0.3, 0.6, size=(4, 3, 3)), jnp.float32))
  losses = jnp.ones(3)
  first = GradVacState(states.targets[0])
  eager = _METHOD.update(xs[0], first, losses=losses, key=keys[0])
  jitted = [_update(x, k, GradVacState(t)) for x, k, t in zip(xs, keys, states.targets,
                                                                strict=True)]
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted[0]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda x, s, k: _METHOD.update(x, s, losses=losses, key=k))(xs, states, keys)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched[1].targets, np.stack([j[1].targets for j in jitted]),
                             rtol=1e-5, atol=1e-6)
  tree = {"a": xs[0][:, :12].reshape(3, 3, 4), "b": xs[0][:, 12:]}
  tree_out = _JIT_UPDATE(tree, first, losses=losses, key=keys[0])
  flat = jnp.concatenate([tree_out[0]["a"].reshape(-1), tree_out[0]["b"]])
  np.testing.assert_allclose(flat, eager[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tree_out[2], eager[2], rtol=1e-5, atol=1e-6)


def test_rejects_bad_beta():
  with pytest.raises(ValueError, match="beta"):
    weighting.get("gradvac", beta=1.5)
