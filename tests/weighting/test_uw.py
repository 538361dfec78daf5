"""Uncertainty weighting (Kendall, Gal & Cipolla, 2018)."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "uw"


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

def _objective(log_vars, losses):
  """Kendall et al. (2018) in LibMTL's form: Σ L_t / (2 exp(s_t)) + s_t / 2."""
  return jnp.sum(losses * jnp.exp(-log_vars) / 2 + log_vars / 2)


def test_weights_and_step_match_the_analytic_gradient():
  lr = 0.1
  method = weighting.get(NAME, lr=lr)
  state = method.init(3)
  np.testing.assert_allclose(state.log_vars, -0.5)  # LibMTL's initial value
  losses = jnp.array([0.3, 1.0, 4.0])
  grads = jax.random.normal(KEY, (3, 9))
  combined, new_state, weights = method.update(grads, state, losses=losses, key=KEY)
  # The effective weights are ∂objective/∂L_t = exp(-s_t) / 2.
  np.testing.assert_allclose(weights, jax.grad(_objective, argnums=1)(state.log_vars, losses),
                             rtol=1e-6)
  np.testing.assert_allclose(combined, weights @ grads, rtol=1e-5, atol=1e-6)
  expected = state.log_vars - lr * jax.grad(_objective)(state.log_vars, losses)
  np.testing.assert_allclose(new_state.log_vars, expected, rtol=1e-6, atol=1e-7)


def test_weight_falls_for_a_big_loss_and_rises_for_a_small_one():
  method = weighting.get(NAME)
  state = method.init(2)
  losses = jnp.array([10.0, 0.01])
  history = []
  for _ in range(10):
    _, state, weights = method.update(None, state, losses=losses, key=KEY)
    history.append(weights)
  history = np.stack(history)
  assert np.all(np.diff(history[:, 0]) < 0)
  assert np.all(np.diff(history[:, 1]) > 0)


def test_converges_to_the_stationary_point():
  # ∂objective/∂s_t = 0  <=>  exp(s_t) = L_t, so the weights tend to 1 / (2 L_t).
  method = weighting.get(NAME, lr=0.2)
  losses = jnp.array([0.5, 2.0])
  update = jax.jit(method.update)
  state = method.init(2)
  for _ in range(300):
    _, state, weights = update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(weights, 1 / (2 * losses), rtol=1e-3)


def test_without_grads_returns_none():
  method = weighting.get(NAME)
  combined, _, weights = method.update(None, method.init(2), losses=jnp.ones(2), key=KEY)
  assert combined is None and weights.shape == (2,)
