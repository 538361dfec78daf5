"""Checks and inputs shared by the weighting tests (one copy; each test_<method>.py calls them).

* ``CONTRACT_CHECKS``: the contract of a (stateful) weighting method run for a few calls on
  adversarial inputs, under jit and vmap, and on pytree gradients.
* ``run_once``, ``jacobian_cases``, ``pair_cases``, ``check_batched_and_tree``,
  ``check_eager_jit_vmap_tree``: one update from ``init`` for the gradient-level methods.
* ``DUAL_CONE_CHECKS``: the properties UPGrad and DualProj share (Quinton & Rey, 2024).
* ``simplex_kkt_points``, ``project_simplex``: float64 references for simplex problems.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import mtjax.weighting as W

KEY = jax.random.PRNGKey(0)


def check_id(check):
  """A readable pytest id for a check function: its name without ``check_``."""
  return check.__name__.removeprefix("check_")


# --- the contract of a method run for a few calls (losses falling, state carried) ---

def adversarial_grads(d=16):
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


def decay(i, num_tasks):
  return jnp.exp(-0.1 * i * jnp.arange(1, num_tasks + 1) ** 2 / num_tasks ** 2)


def run(method, grads, losses, calls=3, jit=False):
  """``calls`` updates on fixed gradients, the losses shrinking at task-dependent rates."""
  grads_like = jax.tree_util.tree_map(lambda x: jnp.zeros_like(x[0]), grads)
  num = jax.tree_util.tree_leaves(grads)[0].shape[0]
  state = method.init(num, grads_like=grads_like)
  update = jax.jit(method.update) if jit else method.update
  for i in range(calls):
    out = update(grads, state, losses=losses * decay(i, num), key=jax.random.fold_in(KEY, i))
    combined, state, weights = out
  return combined, state, weights


def check_adversarial(method):
  """Finite outputs and state on adversarial inputs; combined == Σ_t w_t g_t when w is finite."""
  for name, grads in adversarial_grads().items():
    losses = jnp.linspace(1.0, 2.0, grads.shape[0])
    combined, state, weights = run(method, grads, losses, jit=True)
    assert combined.shape == grads.shape[1:], name
    assert bool(jnp.all(jnp.isfinite(combined))), name
    assert weights.shape == (grads.shape[0],) and weights.dtype == jnp.float32, name
    for leaf in jax.tree_util.tree_leaves(state):
      assert bool(jnp.all(jnp.isfinite(leaf))), name
    if bool(jnp.all(jnp.isfinite(weights))):  # NaN weights: not a weighting (allowed)
      scale = float(jnp.max(jnp.abs(weights))) * float(jnp.max(jnp.abs(grads)))
      np.testing.assert_allclose(combined, weights @ grads, rtol=1e-4, atol=1e-5 * scale + 1e-30,
                                 err_msg=name)


def check_jit_vmap(method, batch=4, num_tasks=3, dim=20):
  """Eager, jit and jit(vmap) runs of three calls agree."""
  grads = jax.random.normal(jax.random.PRNGKey(2), (batch, num_tasks, dim))
  losses = jax.random.uniform(jax.random.PRNGKey(3), (batch, num_tasks), minval=0.5, maxval=2)
  eager = run(method, grads[0], losses[0])  # eager dispatch is slow: one problem
  jitted = [run(method, grads[i], losses[i], jit=True) for i in range(batch)]
  np.testing.assert_allclose(eager[0], jitted[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eager[2], jitted[0][2], rtol=1e-5, atol=1e-6)
  state = jax.vmap(lambda g: method.init(num_tasks, grads_like=g[0]))(grads)
  step = jax.jit(jax.vmap(lambda g, s, loss, k: method.update(g, s, losses=loss, key=k)))
  for i in range(3):
    keys = jnp.stack([jax.random.fold_in(KEY, i)] * batch)
    combined, state, weights = step(grads, state, losses * decay(i, num_tasks), keys)
  for i in range(batch):
    np.testing.assert_allclose(combined[i], jitted[i][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights[i], jitted[i][2], rtol=1e-5, atol=1e-6)


def check_pytree(method, num_tasks=3):
  """Pytree gradients give the same combined update and weights as the flat matrix."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  tree = {"a": jax.random.normal(k1, (num_tasks, 4, 5)),
          "b": jax.random.normal(k2, (num_tasks, 7))}
  flat = jnp.concatenate([tree["a"].reshape(num_tasks, -1), tree["b"]], axis=1)
  losses = jnp.linspace(0.5, 1.5, num_tasks)
  c_tree, _, w_tree = run(method, tree, losses)
  c_flat, _, w_flat = run(method, flat, losses)
  joined = jnp.concatenate([c_tree["a"].reshape(-1), c_tree["b"]])
  np.testing.assert_allclose(joined, c_flat, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(w_tree, w_flat, rtol=1e-5, atol=1e-6)


CONTRACT_CHECKS = (check_adversarial, check_jit_vmap, check_pytree)


def check_without_grads_returns_none(method):
  """A loss-level method called without gradients returns None and still its weights."""
  combined, _, weights = method.update(None, method.init(2), losses=jnp.ones(2), key=KEY)
  assert combined is None and weights.shape == (2,)


# --- one update from init, for the gradient-level methods ---

_JITTED = {}


def run_once(method, grads, state=None, losses=None, key=KEY):
  """One jitted update from ``method.init`` (or ``state``); the losses default to ones."""
  if isinstance(grads, np.ndarray):
    grads = jnp.asarray(grads, jnp.float32)
  t = jax.tree_util.tree_leaves(grads)[0].shape[0]
  state = method.init(t) if state is None else state
  losses = jnp.ones((t,)) if losses is None else losses
  update = _JITTED.setdefault(method.update, jax.jit(method.update))
  return update(grads, state, losses=losses, key=key)


def jacobian_cases(seed):
  """Adversarial task Jacobians built from three random rows (float32, 16 columns)."""
  base = np.random.default_rng(seed).normal(size=(3, 16)).astype(np.float32)
  cases = {
      "conflict": np.stack([base[0], -base[0]]),
      "zero_one": np.stack([base[0], 0 * base[0], base[1]]),
      "all_zero": np.zeros((3, 16), np.float32),
      "identical": np.stack([base[0]] * 3),
      "t1": base[:1],
      "x100": np.stack([base[0] * 100, base[1]]),
      "tiny": base * 1e-20,
  }
  return base, cases


def pair_cases(g1, g2):
  """Adversarial inputs built from two gradients (float64 numpy)."""
  return {
      "opposite": np.stack([g1, -g1]),
      "one_100x": np.stack([100.0 * g1, g2]),
      "identical": np.stack([g1, g1]),
      "zero": np.stack([g1, 0.0 * g2]),
      "all_zero": np.zeros((2,) + g1.shape),
      "single": g1[None],
      "tiny": 1e-20 * np.stack([g1, g2]),
  }


def check_batched_and_tree(method, seed, batch_w_tol, tree_w_tol, tree_d_tol):
  """jit(vmap) over 3 Jacobians agrees with eager and with ``run_once``; a pytree split of the
  gradients gives the flat weights and update. The tolerances are ``assert_allclose`` kwargs."""
  j = jnp.asarray(np.random.default_rng(seed).normal(size=(3, 3, 12)), jnp.float32)
  state = method.init(3)
  eager = method.update(j[0], state, losses=jnp.ones(3), key=KEY)
  batched = jax.jit(jax.vmap(lambda g: method.update(g, state, losses=jnp.ones(3), key=KEY)))(j)
  np.testing.assert_allclose(batched[0][0], eager[0], atol=1e-5)
  for k in range(3):
    d, _, w = run_once(method, j[k])
    np.testing.assert_allclose(batched[2][k], w, **batch_w_tol)
    dt, _, wt = run_once(method, {"a": j[k][:, :5], "b": j[k][:, 5:].reshape(3, 7, 1)})
    np.testing.assert_allclose(wt, w, **tree_w_tol)
    np.testing.assert_allclose(jnp.concatenate([dt["a"], dt["b"].reshape(-1)]), d, **tree_d_tol)


def check_eager_jit_vmap_tree(method, seed):
  """Eager, jit, vmap and a pytree split agree for a method that takes no key."""
  xs = jnp.asarray(np.random.default_rng(seed).normal(size=(4, 3, 20)), jnp.float32)
  losses = jnp.ones(3)
  state = method.init(3)
  eager = method.update(xs[0], state, losses=losses, key=None)
  jitted = [run_once(method, x, key=None) for x in xs]
  np.testing.assert_allclose(eager[0], jitted[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eager[2], jitted[0][2], rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda x: method.update(x, state, losses=losses, key=None))(xs)
  np.testing.assert_allclose(batched[0], np.stack([j[0] for j in jitted]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(batched[2], np.stack([j[2] for j in jitted]), rtol=1e-4, atol=1e-5)
  tree = {"a": xs[0][:, :12].reshape(3, 3, 4), "b": xs[0][:, 12:]}
  tree_out = run_once(method, tree, key=None)
  flat = jnp.concatenate([tree_out[0]["a"].reshape(-1), tree_out[0]["b"]])
  np.testing.assert_allclose(flat, eager[0], rtol=1e-5, atol=1e-6)


# --- UPGrad and DualProj (Quinton & Rey, 2024): projections onto the dual cone ---

def conflict_bound(j, w, reg_eps=1e-4):
  """Prop. 1 with the ridge: <g_t, d> >= -reg_eps w_t tr(G) (exactly >= 0 without the ridge)."""
  return -reg_eps * np.abs(w) * np.trace(j @ j.T) - 1e-5 * np.trace(j @ j.T)


def check_non_conflicting(name):
  """<g_t, d> >= 0 for every task (UPGrad: Theorem 1; DualProj: by construction), random +
  adversarial."""
  method = W.get(name)
  rng = np.random.default_rng(0)
  cases = [rng.normal(size=(t, 10)) for t in (2, 3, 5) for _ in range(3)]
  a = rng.normal(size=10)
  cases += [np.stack([a, -a]), np.stack([a, -0.9 * a + 0.1 * rng.normal(size=10), a * 100]),
            rng.normal(size=(5, 2))]  # 5 gradients in 2 dims
  for j in cases:
    d, _, w = run_once(method, jnp.asarray(j, jnp.float32))
    assert np.all(j @ np.asarray(d, np.float64) >= conflict_bound(j, np.asarray(w)))
    np.testing.assert_allclose(d, np.asarray(w) @ j, atol=1e-5 * np.abs(j).max())


def check_mean_when_no_conflict_and_scaling(name):
  """Pairwise non-negative inner products => the result is exactly the mean (UPGrad: each g_t/T
  is already in the dual cone; DualProj: the mean is); multiplying all gradients by k > 0
  multiplies the result by k."""
  method = W.get(name)
  rng = np.random.default_rng(1)
  j = np.abs(rng.normal(size=(4, 10))).astype(np.float32)
  d, _, w = run_once(method, jnp.asarray(j))
  np.testing.assert_allclose(w, np.full(4, 0.25), atol=1e-6)
  np.testing.assert_allclose(d, j.mean(0), atol=1e-6)
  j = rng.normal(size=(4, 10)).astype(np.float32)
  d1, _, w1 = run_once(method, jnp.asarray(j))
  d2, _, w2 = run_once(method, jnp.asarray(j * 7.0))
  np.testing.assert_allclose(w2, w1, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d2, 7.0 * d1, rtol=1e-4, atol=1e-5)


def check_adversarial_inputs_finite(name):
  """Finite on adversarial Jacobians; T = 1 gives the gradient, g and -g give 0."""
  method = W.get(name)
  base, cases = jacobian_cases(2)
  for j in cases.values():
    d, _, w = run_once(method, jnp.asarray(j))
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
  d, _, _ = run_once(method, jnp.asarray(base[:1]))
  np.testing.assert_allclose(d, base[0], atol=1e-6)  # T = 1: the gradient itself
  d, _, _ = run_once(method, jnp.asarray(np.stack([base[0], -base[0]])))
  np.testing.assert_allclose(d, 0.0, atol=1e-3 * np.abs(base[0]).max())


def check_pref_vector(name):
  """Without conflict the weights are the preference vector; its length is checked."""
  rng = np.random.default_rng(4)
  j = np.abs(rng.normal(size=(3, 8))).astype(np.float32)  # no conflict: Σ_t p_t g_t
  m = W.get(name, pref_vector=(0.5, 0.3, 0.2))
  d, _, w = jax.jit(m.update)(jnp.asarray(j), m.init(3), losses=jnp.ones(3), key=KEY)
  np.testing.assert_allclose(w, [0.5, 0.3, 0.2], atol=1e-6)
  try:
    m.init(4)
    raise AssertionError("expected ValueError")
  except ValueError as e:
    assert "pref_vector" in str(e)


def check_jit_vmap_pytree_agree(name):
  check_batched_and_tree(W.get(name), 3, {"atol": 1e-5}, {"atol": 1e-4}, {"atol": 1e-4})


DUAL_CONE_CHECKS = (check_non_conflicting, check_mean_when_no_conflict_and_scaling,
                    check_adversarial_inputs_finite, check_pref_vector,
                    check_jit_vmap_pytree_agree)


# --- float64 references for problems on the simplex ---

def simplex_kkt_points(g):
  """The KKT points of min_{w ∈ Δ} wᵀ g w, one per support: yields (support, w on it)."""
  t = g.shape[0]
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      kkt = np.zeros((r + 1, r + 1))
      kkt[:r, :r], kkt[:r, r], kkt[r, :r] = g[np.ix_(s, s)], -1.0, 1.0
      sol = np.linalg.lstsq(kkt, np.r_[np.zeros(r), 1.0], rcond=None)[0]
      if np.all(sol[:r] >= -1e-12) and np.allclose(kkt @ sol, np.r_[np.zeros(r), 1.0]):
        yield s, sol[:r]


def project_simplex(v):
  """Euclidean projection onto the probability simplex (sort-based, float64)."""
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1), 0.0)
