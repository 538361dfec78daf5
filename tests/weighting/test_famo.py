"""FAMO, fast adaptive multitask optimization (Liu et al., 2023)."""

import jax
import jax.numpy as jnp
import numpy as np

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "famo"


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

def _famo_objective(losses, z, min_losses):
  """Liu et al. (2023): Σ_t z_t log(L_t - L*_t + ε) / c, c = Σ_t z_t / (L_t - L*_t + ε) fixed."""
  gap = losses - min_losses + 1e-8
  c = jax.lax.stop_gradient(jnp.sum(z / gap))
  return jnp.sum(z * jnp.log(gap)) / c


def test_weights_are_the_gradient_of_the_famo_objective():
  method = weighting.get(NAME)
  state = method.init(3)._replace(logits=jnp.array([0.3, -0.2, 0.1]),
                                  min_losses=jnp.array([0.0, 0.1, 0.2]))
  losses = jnp.array([0.5, 1.0, 2.0])
  grads = jax.random.normal(KEY, (3, 7))
  combined, new_state, weights = method.update(grads, state, losses=losses, key=KEY)
  # First call: no previous losses, so the logits take no step.
  np.testing.assert_array_equal(new_state.logits, state.logits)
  z = jax.nn.softmax(state.logits)
  expected = jax.grad(_famo_objective)(losses, z, state.min_losses)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-6)
  np.testing.assert_allclose(combined, weights @ grads, rtol=1e-5, atol=1e-6)


def test_constant_losses_keep_equal_logits():
  method = weighting.get(NAME)
  state = method.init(3)
  losses = jnp.array([0.2, 1.0, 5.0])
  for _ in range(10):
    _, state, weights = method.update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(state.logits, 0.0, atol=1e-7)
  # Equal z: the effective weights are those of Σ_t log L_t / T, i.e. ∝ 1 / L_t.
  np.testing.assert_allclose(weights, (1 / losses) / jnp.sum(1 / losses), rtol=1e-5)
  state = method.init(3)
  for _ in range(5):
    _, state, equal = method.update(None, state, losses=jnp.full(3, 0.7), key=KEY)
  np.testing.assert_allclose(equal, jnp.full(3, 1 / 3), rtol=1e-6)


def test_second_call_takes_one_adam_step():
  lr = 0.05
  method = weighting.get(NAME, w_lr=lr)
  state = method.init(3)
  _, state, _ = method.update(None, state, losses=jnp.array([1.0, 1.0, 1.0]), key=KEY)
  _, state, _ = method.update(None, state, losses=jnp.array([0.5, 0.9, 2.0]), key=KEY)
  # δ = log(prev) - log(curr); ∇_logits = J_softmax^T δ; Adam's first step is -lr·sign(∇)
  # (up to ε = 1e-8 against |∇|, which is not small here).
  delta = -jnp.log(jnp.array([0.5, 0.9, 2.0]))
  grad = jax.vjp(jax.nn.softmax, jnp.zeros(3))[1](delta)[0]
  np.testing.assert_allclose(state.logits, -lr * jnp.sign(grad), rtol=1e-4, atol=1e-6)
  assert int(state.count) == 1


def test_weight_moves_to_the_task_whose_loss_falls_slower():
  method = weighting.get(NAME)
  state = method.init(2)
  update = jax.jit(method.update)
  for k in range(30):
    losses = jnp.array([0.9 ** k, 0.99 ** k])  # task 0 fast, task 1 slow
    _, state, _ = update(None, state, losses=losses, key=KEY)
  z = jax.nn.softmax(state.logits)
  assert float(z[1]) > 0.6 > 0.4 > float(z[0])


def test_zero_loss_stays_finite():
  method = weighting.get(NAME)
  state = method.init(2)
  for losses in ([1.0, 0.0], [0.0, 0.0], [1.0, 1e-20]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w))), losses
    assert bool(jnp.all(jnp.isfinite(state.logits))), losses


def test_without_grads_returns_none():
  method = weighting.get(NAME)
  combined, _, weights = method.update(None, method.init(2), losses=jnp.ones(2), key=KEY)
  assert combined is None and weights.shape == (2,)
