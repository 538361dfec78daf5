"""GradNorm (Chen et al., 2018)."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "gradnorm"


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

def _spread(weights, norms):
  g = weights * norms
  return float(jnp.std(g) / jnp.mean(g))


def test_reduces_the_spread_of_weighted_gradient_norms():
  method = weighting.get(NAME)
  scales = jnp.array([0.2, 1.0, 5.0])
  grads = scales[:, None] * jax.random.normal(KEY, (3, 30))
  norms = jnp.linalg.norm(grads, axis=1)
  losses = jnp.array([1.0, 2.0, 0.5])  # constant: equal training rates, target = mean norm
  state = method.init(3)
  update = jax.jit(method.update)
  spreads = []
  for _ in range(150):
    combined, state, w = update(grads, state, losses=losses, key=KEY)
    np.testing.assert_allclose(jnp.sum(state.weights), 3.0, rtol=1e-5)
    assert bool(jnp.all(state.weights > 0))
    spreads.append(_spread(w, norms))
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-5)
  assert spreads[0] > 1.0
  assert spreads[-1] < 0.1 * spreads[0]
  assert max(spreads[-20:]) < 0.2


def test_initial_losses_and_the_first_step():
  lr = 0.01
  method = weighting.get(NAME, lr=lr)
  grads = jnp.stack([jnp.ones(4), 3.0 * jnp.ones(4)])
  losses = jnp.array([2.0, 1.0])
  combined, state, w = method.update(grads, method.init(2), losses=losses, key=KEY)
  np.testing.assert_array_equal(w, jnp.ones(2))
  np.testing.assert_allclose(combined, grads.sum(0), rtol=1e-6)
  np.testing.assert_array_equal(state.initial_losses, losses)
  # r_t = 1, target = mean(G) = 4: ∂L_grad/∂w = (-2, +6); Adam's first step is -lr·sign, then
  # renormalisation to Σw = 2 (already the case).
  np.testing.assert_allclose(state.weights, [1 + lr, 1 - lr], rtol=1e-5)
  _, state2, _ = method.update(grads, state, losses=0.5 * losses, key=KEY)
  np.testing.assert_array_equal(state2.initial_losses, losses)  # kept from the first call


def test_slower_task_gets_the_larger_gradient_norm():
  # Equal gradient norms; task 1's loss stays, task 0's falls: r_1 > r_0, so G_1 > G_0.
  method = weighting.get(NAME, alpha=1.5)
  grads = jnp.stack([jnp.ones(5), -jnp.ones(5)])
  state = method.init(2)
  update = jax.jit(method.update)
  for k in range(60):
    _, state, w = update(grads, state, losses=jnp.array([0.97 ** k, 1.0]), key=KEY)
  assert float(w[1]) > 1.2 > 0.8 > float(w[0])
