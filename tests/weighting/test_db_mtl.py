"""DB-MTL, dual-balancing multi-task learning (Lin et al., 2023)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "db_mtl"


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

def test_init_needs_grads_like():
  with pytest.raises(ValueError, match="grads_like"):
    weighting.get(NAME).init(3)


def test_contributions_reach_the_max_norm_after_the_ema_converges():
  k1, k2, k3 = jax.random.split(KEY, 3)
  grads = jnp.stack([0.1 * jax.random.normal(k1, (25,)), jax.random.normal(k2, (25,)),
                     10.0 * jax.random.normal(k3, (25,))])
  losses = jnp.array([0.5, 2.0, 1.0])
  method = weighting.get(NAME)
  state = method.init(3, grads_like=grads[0])
  update = jax.jit(method.update)
  for _ in range(80):  # 0.9**80 ≈ 2e-4
    combined, state, weights = update(grads, state, losses=losses, key=KEY)
  log_grads = grads / losses[:, None]  # ∇ log L_t = g_t / L_t
  np.testing.assert_allclose(state.grad_ema, log_grads, rtol=1e-3, atol=1e-6)
  norms = jnp.linalg.norm(log_grads, axis=1)
  unit = log_grads / norms[:, None]
  np.testing.assert_allclose(combined, jnp.max(norms) * unit.sum(0), rtol=1e-3, atol=1e-4)
  # Each task's contribution α_t m_t has norm max_k ||m_k||.
  ema_norms = jnp.linalg.norm(state.grad_ema, axis=1)
  contrib = (jnp.max(ema_norms) / (ema_norms + 1e-8))[:, None] * state.grad_ema
  np.testing.assert_allclose(jnp.linalg.norm(contrib, axis=1), jnp.max(norms), rtol=1e-3)
  assert bool(jnp.all(jnp.isnan(weights)))  # an EMA direction is not Σ w_t g_t


def test_beta_zero_is_an_exact_weighting_and_loss_scale_free():
  method = weighting.get(NAME, beta=0.0)
  grads = jax.random.normal(KEY, (3, 12))
  losses = jnp.array([0.3, 1.0, 3.0])
  state = method.init(3, grads_like=grads[0])
  combined, _, w = method.update(grads, state, losses=losses, key=KEY)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)
  log_grads = grads / (losses[:, None] + 1e-8)
  norms = jnp.linalg.norm(log_grads, axis=1)
  np.testing.assert_allclose(combined, (jnp.max(norms) * log_grads / norms[:, None]).sum(0),
                             rtol=1e-5, atol=1e-5)
  # Scaling task 1's loss by c scales its gradient by c: the log-gradient, so the
  # direction, is unchanged (the loss-scale balance).
  c = jnp.array([1.0, 50.0, 1.0])
  combined_c, _, _ = method.update(c[:, None] * grads, state, losses=c * losses, key=KEY)
  np.testing.assert_allclose(combined_c, combined, rtol=1e-4, atol=1e-5)


def test_ema_rate_schedule():
  beta, sigma = 0.8, 0.5
  method = weighting.get(NAME, beta=beta, beta_sigma=sigma)
  g1, g2 = jax.random.normal(KEY, (2, 2, 6))
  state = method.init(2, grads_like=g1[0])
  _, state, _ = method.update(g1, state, losses=jnp.ones(2), key=KEY)
  m1 = (1 - beta) * g1  # k = 1: β_1 = β, m starts at zero
  np.testing.assert_allclose(state.grad_ema, m1, rtol=1e-5, atol=1e-6)
  _, state, _ = method.update(g2, state, losses=jnp.ones(2), key=KEY)
  b2 = beta / 2 ** sigma
  np.testing.assert_allclose(state.grad_ema, b2 * m1 + (1 - b2) * g2, rtol=1e-5, atol=1e-6)
