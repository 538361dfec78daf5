"""Dynamic weight average (Liu, Johns & Davison, 2019)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting

KEY = jax.random.PRNGKey(0)
NAME = "dwa"


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

def _dwa_closed_form(older, newer, temperature=2.0):
  r = np.asarray(newer, np.float64) / np.asarray(older, np.float64)
  e = np.exp(r / temperature)
  return len(r) * e / e.sum()


def test_equal_weights_then_closed_form_on_a_two_step_history():
  method = weighting.get(NAME)
  state = method.init(3)
  l1, l2, l3 = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, 1.9, 3.3]), jnp.array([0.4, 1.5, 3.0])
  _, state, w1 = method.update(None, state, losses=l1, key=KEY)
  _, state, w2 = method.update(None, state, losses=l2, key=KEY)
  np.testing.assert_array_equal(w1, jnp.ones(3))
  np.testing.assert_array_equal(w2, jnp.ones(3))
  grads = jax.random.normal(KEY, (3, 8))
  combined, state, w3 = method.update(grads, state, losses=l3, key=KEY)
  np.testing.assert_allclose(w3, _dwa_closed_form(l1, l2), rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(w3), 3.0, rtol=1e-6)
  np.testing.assert_allclose(combined, w3 @ grads, rtol=1e-5, atol=1e-6)
  # The task whose loss fell least (task 2 rose) gets the largest weight.
  assert int(jnp.argmax(w3)) == 2
  _, _, w4 = method.update(None, state, losses=l3, key=KEY)
  np.testing.assert_allclose(w4, _dwa_closed_form(l2, l3), rtol=1e-5)


def test_temperature_and_period():
  method = weighting.get(NAME, temperature=0.5, period=2)
  state = method.init(2)
  seq = [jnp.array(v) for v in ([1.0, 1.0], [3.0, 1.0], [1.0, 0.2], [1.0, 0.2], [5.0, 5.0])]
  ws = []
  for losses in seq:
    _, state, w = method.update(None, state, losses=losses, key=KEY)
    ws.append(w)
  for w in ws[:4]:  # two full periods are needed before the first ratio
    np.testing.assert_array_equal(w, jnp.ones(2))
  older, newer = (seq[0] + seq[1]) / 2, (seq[2] + seq[3]) / 2
  np.testing.assert_allclose(ws[4], _dwa_closed_form(older, newer, 0.5), rtol=1e-5)


def test_bad_period_raises():
  with pytest.raises(ValueError, match="period"):
    weighting.get(NAME, period=0)


def test_zero_previous_loss_stays_finite():
  method = weighting.get(NAME)
  state = method.init(2)
  for losses in ([0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]):
    _, state, w = method.update(None, state, losses=jnp.array(losses), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w)))
    np.testing.assert_allclose(jnp.sum(w), 2.0, rtol=1e-6)


def test_without_grads_returns_none():
  method = weighting.get(NAME)
  combined, _, weights = method.update(None, method.init(2), losses=jnp.ones(2), key=KEY)
  assert combined is None and weights.shape == (2,)
