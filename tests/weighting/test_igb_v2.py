"""IGBv2 (Dai et al. 2023), registered as igb: Σ_t v_t log L_t with v = T softmax(u) the action
of a soft actor-critic agent (mtjax.weighting.sac), trained from a replay buffer on device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from mtjax.weighting import sac

NAME = "igb"
# A small agent that trains from the first calls: every call after call 0 is an update round.
SMALL = dict(buffer_size=16, batch_size=8, hidden=8, update_every=1, update_after=1,
             start_epoch=2, base_epoch=0)


def test_adversarial_losses_with_the_agent_training():
  """Huge, tiny, zero, mixed and equal losses, the agent training at every call (one compile;
  the registry's test covers adversarial gradients and T = 1, 2): all finite, v sums to T."""
  method = W.get(NAME, **SMALL)
  update = jax.jit(lambda s, loss, k: method.update(None, s, losses=loss, key=k))
  cases = {"huge": [1e10, 1e10, 2e10], "tiny": [1e-20, 1e-30, 0.0], "zero": [0.0, 0.0, 0.0],
           "mixed": [1e10, 1e-20, 1.0], "equal": [1.0, 1.0, 1.0]}
  for name, losses in cases.items():
    state = method.init(3)
    for i in range(4):
      loss = jnp.asarray(losses, jnp.float32) * 0.9 ** i
      _, state, weights = update(state, loss, jax.random.PRNGKey(i))
      for leaf in jax.tree_util.tree_leaves((weights, state)):
        assert bool(jnp.all(jnp.isfinite(leaf))), (name, i)
    assert int(state.buffer.size) == 3 and float(state.agent.log_alpha) != np.log(0.2), name
    v = state.prev_action
    assert bool(jnp.all(v >= 0)) and abs(float(v.sum()) - 3) < 1e-4, name


def _calls(method, losses, keys):
  update = jax.jit(method.update)
  state = method.init(losses.shape[1])
  out = []
  for loss, key in zip(losses, keys, strict=True):
    _, state, weights = update(None, state, losses=loss, key=key)
    out.append((weights, state))
  return out


def test_schedule_buffer_rewards_weights_and_determinism():
  """Per call c: the transition (L_prev, v_prev, min_t (L_prev − L)_t / L_base, L) is stored
  once L_base (the mean loss of epoch base_epoch) exists; the agent trains only at calls
  c >= update_after with c % update_every == 0; v = L w is positive and sums to T, random until
  start_epoch, then the actor's sample. The same keys give the same bits, others not."""
  method = W.get(NAME, **{**SMALL, "base_epoch": 1, "update_every": 2, "update_after": 3,
                          "start_epoch": 4, "steps_per_epoch": 1})
  t = 3
  losses = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, size=(8, t)), jnp.float32)
  keys = [jax.random.PRNGKey(i) for i in range(8)]
  out = _calls(method, losses, keys)
  again = _calls(method, losses, keys)
  for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again), strict=True):
    np.testing.assert_array_equal(x, y)
  other = _calls(method, losses, [jax.random.PRNGKey(i + 10) for i in range(8)])
  assert not np.allclose(other[-1][0], out[-1][0])
  base = losses[1]  # epoch 1 = call 1
  prev_actor = out[0][1].agent.actor
  for c, (weights, state) in enumerate(out):
    v = weights * losses[c]
    assert np.all(v > 0) and abs(float(v.sum()) - t) < 1e-4, c
    stored = max(c - 1, 0)  # transitions from call 2 on (base exists after call 1)
    assert int(state.buffer.size) == stored and int(state.buffer.ptr) == stored, c
    if c >= 2:
      row = c - 2
      np.testing.assert_allclose(state.buffer.states[row], losses[c - 1])
      np.testing.assert_allclose(state.buffer.actions[row], out[c - 1][0] * losses[c - 1],
                                 rtol=1e-6)
      np.testing.assert_allclose(state.buffer.rewards[row],
                                 np.min((losses[c - 1] - losses[c]) / base), rtol=1e-5)
      np.testing.assert_allclose(state.buffer.next_states[row], losses[c])
    trained = c >= 3 and c % 2 == 0
    moved = not np.array_equal(state.agent.actor["w0"], prev_actor["w0"])
    assert moved == trained, c
    prev_actor = state.agent.actor
    if c >= 4:  # the actor's sample at L with this call's key
      noise = jax.random.normal(jax.random.split(jax.random.PRNGKey(c))[1], (2, t))[1]
      expected, _ = sac.act(state.agent.actor, losses[c], noise)
      np.testing.assert_allclose(v, expected, rtol=1e-5)


def test_buffer_is_a_ring():
  buf = sac.buffer_init(4, 2, 2)
  add = jax.jit(sac.buffer_add)
  for i in range(6):
    s = jnp.full(2, float(i))
    buf = add(buf, s, -s, float(i), s + 0.5, True)
  buf = add(buf, jnp.full(2, 99.0), jnp.zeros(2), 99.0, jnp.zeros(2), False)  # not written
  assert int(buf.ptr) == 2 and int(buf.size) == 4
  np.testing.assert_array_equal(buf.rewards, [4.0, 5.0, 2.0, 3.0])  # rows 0, 1 overwritten
  np.testing.assert_array_equal(buf.states[:, 0], [4.0, 5.0, 2.0, 3.0])
  np.testing.assert_array_equal(buf.actions[:, 1], [-4.0, -5.0, -2.0, -3.0])
  np.testing.assert_array_equal(buf.next_states[:, 0], [4.5, 5.5, 2.5, 3.5])


def test_update_counts_are_the_official_schedule():
  # int(updates k / 2) steps of int(batch k / 2) rows, k = 1 + size / capacity.
  for size, steps, rows in ((0, 25, 128), (5000, 37, 192), (10000, 50, 256), (1, 25, 128)):
    got = sac.update_counts(size, 10000, 50, 256)
    assert (int(got[0]), int(got[1])) == (steps, rows), size


def test_log_prob_is_the_official_formula_in_float64():
  rng = np.random.default_rng(0)
  mu, log_std, u = rng.normal(size=(3, 5, 4))
  std = np.exp(log_std)
  gauss = -0.5 * ((u - mu) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
  expected = gauss.sum(-1) - (2 * (np.log(2) - u - np.logaddexp(0, -2 * u))).sum(-1)
  got = sac.squash_log_prob(*(jnp.asarray(x, jnp.float32) for x in (mu, log_std, u)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_critic_steps_reduce_the_td_error_on_a_fixed_buffer():
  """SAC steps on a fixed buffer lower the critics' squared TD error against the targets of
  the initial agent, and the target critics move less than the critics (Polyak averaging)."""
  config = sac.Config(hidden=16, batch_size=32)
  rng = np.random.default_rng(1)
  buf = sac.buffer_init(32, 3, 3)
  for _ in range(32):
    s, s2 = rng.uniform(0.5, 2, size=(2, 3))
    buf = sac.buffer_add(buf, s, 3 * rng.dirichlet(np.ones(3)), float(np.min(s - s2)), s2)
  agent = sac.agent_init(jax.random.PRNGKey(0), 3, 3, config)
  rows, noise = sac.draws(jax.random.PRNGKey(5), 32, 100, 3, config)
  targets = sac.td_targets(agent, buf.rewards, buf.next_states, noise[0, 0], config)
  weights = jnp.full(32, 1 / 32)

  @jax.jit
  def run(agent):
    return jax.lax.fori_loop(0, 100, lambda i, a: sac.sac_step(a, buf, rows[i], noise[i], 32,
                                                                config), agent)
  trained = run(agent)
  before = sac.critic_loss(agent.critic, buf.states, buf.actions, targets, weights)
  after = sac.critic_loss(trained.critic, buf.states, buf.actions, targets, weights)
  assert float(after) < 0.8 * float(before), (before, after)
  for t0, t1, c1 in zip(jax.tree_util.tree_leaves(agent.target),
                        jax.tree_util.tree_leaves(trained.target),
                        jax.tree_util.tree_leaves(trained.critic), strict=True):
    assert float(jnp.max(jnp.abs(t1 - t0))) < float(jnp.max(jnp.abs(c1 - t0))) + 1e-7


def test_checks():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    W.get(NAME, steps_per_epoch=0)
  with pytest.raises(ValueError, match="buffer_size"):
    W.get(NAME, buffer_size=0)
