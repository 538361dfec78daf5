"""A fixed-size soft actor-critic agent as pure functions, for IGBv2's loss weights.

Soft actor-critic (Haarnoja et al., 2018, with the learned temperature of Haarnoja et al.,
2018b) as the official IGB code runs it (Dai et al., 2023; YanqiDai/IGB4MTL,
``methods/SAC_Agent.py``, itself after XinJingHao/SAC-Continuous-Pytorch): an actor
``s -> (μ, log σ)`` whose sample ``u = μ + σ ε`` is squashed to the action ``a = A softmax(u)``
(``A`` the action size), two Q critics and their Polyak-averaged targets, Adam on all three
parts. Everything is a fixed-size array: the replay buffer is a ring of ``capacity`` rows with a
write pointer and a fill count, the networks are dicts of arrays, and one call of
:func:`train` runs a data-dependent number of gradient steps in a ``lax.fori_loop`` on device,
each on a fixed-size minibatch with a mask for the rows the official code would not draw. The
random draws of a whole round (minibatch rows, the policy's noise) are made once before the
loop (two draws to compile instead of several per step); :func:`sac_step` itself is
deterministic given them.
Checked once against the official ``SAC_Agent.train`` (PyTorch) with the same initial weights,
minibatch indices and noise: after five steps the actor, critics, targets and ``log α`` agree
to 1e-7 (the check needs PyTorch and the official repository, so it is not a test).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the official Actor's clamp of log σ


class Buffer(NamedTuple):
  """The replay buffer: a ring of ``capacity`` transitions ``(s, a, r, s')``."""

  states: jax.Array       # (capacity, S)
  actions: jax.Array      # (capacity, A)
  rewards: jax.Array      # (capacity,)
  next_states: jax.Array  # (capacity, S)
  ptr: jax.Array          # int32: the row the next transition goes to
  size: jax.Array         # int32: the rows filled, at most capacity


class Agent(NamedTuple):
  """The learned parts: actor, the two critics, their targets, ``log α``, and Adam states."""

  actor: dict
  critic: dict         # {"q1": mlp, "q2": mlp}
  target: dict         # like critic
  log_alpha: jax.Array
  actor_opt: optax.OptState
  critic_opt: optax.OptState
  alpha_opt: optax.OptState


class Config(NamedTuple):
  """The agent's constants (defaults: the official ``SAC_Agent``)."""

  hidden: int = 128        # hid_shape=(128, 128)
  lr: float = 3e-4         # a_lr = c_lr (and the temperature's Adam)
  discount: float = 0.99   # gamma
  tau: float = 0.005       # Polyak rate of the target critics
  init_alpha: float = 0.2  # alpha; adaptive_alpha=True, target entropy -A
  batch_size: int = 256


DEFAULT = Config()


def buffer_init(capacity: int, state_dim: int, action_dim: int) -> Buffer:
  zeros = jnp.zeros
  return Buffer(zeros((capacity, state_dim)), zeros((capacity, action_dim)), zeros((capacity,)),
                zeros((capacity, state_dim)), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buffer: Buffer, s, a, r, s_next, write=True) -> Buffer:
  """``buffer`` with ``(s, a, r, s')`` written at ``ptr`` (the oldest row once full) when
  ``write`` (a traced bool); ``ptr`` advances modulo the capacity, ``size`` up to it."""
  capacity = buffer.rewards.shape[0]
  write = jnp.asarray(write)
  def put(rows, value):
    return rows.at[buffer.ptr].set(jnp.where(write, value, rows[buffer.ptr]))
  step = write.astype(jnp.int32)
  return Buffer(put(buffer.states, s), put(buffer.actions, a), put(buffer.rewards, r),
                put(buffer.next_states, s_next), (buffer.ptr + step) % capacity,
                jnp.minimum(buffer.size + step, capacity))


def _dense_init(unit, fan_in, fan_out):
  """``torch.nn.Linear``'s default initialisation, weight and bias ``U(±1/sqrt(fan_in))``,
  from ``unit``: an iterator over ``U(-1, 1)`` draws (one draw for all layers: each
  ``jax.random`` call is a threefry hash that XLA compiles anew, slowly on CPU)."""
  bound = 1.0 / jnp.sqrt(fan_in)
  return (bound * next(unit)((fan_in, fan_out)), bound * next(unit)((fan_out,)))


def _mlp_init(unit, sizes) -> dict:
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    params[f"w{i}"], params[f"b{i}"] = _dense_init(unit, fan_in, fan_out)
  return params


def _slicer(flat):
  """An endless iterator of ``take(shape)``: the next ``prod(shape)`` entries of ``flat``."""
  start = 0
  while True:
    def take(shape):
      nonlocal start
      size = int(np.prod(shape))
      out = flat[start:start + size].reshape(shape)
      start += size
      return out
    yield take


def _mlp(params: dict, x, last_relu: bool):
  num = len(params) // 2
  for i in range(num):
    x = x @ params[f"w{i}"] + params[f"b{i}"]
    if i < num - 1 or last_relu:
      x = jax.nn.relu(x)
  return x


def agent_init(key, state_dim: int, action_dim: int, config: Config = DEFAULT) -> Agent:
  """Fresh networks (``torch.nn.Linear``'s initialisation), targets equal to the critics."""
  h = config.hidden
  sizes = (state_dim + action_dim, h, h, 1)
  count = (state_dim * h + h + h * h + h + 2 * (h * action_dim + action_dim)
           + 2 * sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True)))
  unit = _slicer(jax.random.uniform(key, (count,), minval=-1.0, maxval=1.0))
  actor = _mlp_init(unit, (state_dim, h, h))
  actor["w_mu"], actor["b_mu"] = _dense_init(unit, h, action_dim)
  actor["w_std"], actor["b_std"] = _dense_init(unit, h, action_dim)
  critic = {"q1": _mlp_init(unit, sizes), "q2": _mlp_init(unit, sizes)}
  log_alpha = jnp.log(jnp.float32(config.init_alpha))
  adam = optax.adam(config.lr)
  return Agent(actor, critic, jax.tree_util.tree_map(jnp.copy, critic), log_alpha,
               adam.init(actor), adam.init(critic), adam.init(log_alpha))


def squash_log_prob(mu, log_std, u):
  """The official actor's ``log π(a)``: the Gaussian log density of ``u`` minus
  ``Σ 2 (log 2 − u − softplus(−2u))``, the tanh squash's log-Jacobian, which the official code
  keeps although its squash is ``A softmax(u)`` (reproduced as is)."""
  gauss = -0.5 * ((u - mu) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
  return jnp.sum(gauss, -1) - jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)


def act(actor: dict, states, noise):
  """``(a, log π(a))`` for ``states`` ``(..., S)``: ``a = A softmax(u)``, ``u = μ + σ ε`` with
  ``ε = noise`` (the reparameterised sample; ``noise = 0``: the deterministic action ``μ``)."""
  body = _mlp({k: v for k, v in actor.items() if k[1:].isdigit()}, states, last_relu=True)
  mu = body @ actor["w_mu"] + actor["b_mu"]
  log_std = jnp.clip(body @ actor["w_std"] + actor["b_std"], LOG_STD_MIN, LOG_STD_MAX)
  u = mu + jnp.exp(log_std) * noise
  action = mu.shape[-1] * jax.nn.softmax(u, axis=-1)
  return action, squash_log_prob(mu, log_std, u)


def q_values(critic: dict, states, actions):
  """``(Q1(s, a), Q2(s, a))``, each ``(...,)``."""
  sa = jnp.concatenate([states, actions], -1)
  return _mlp(critic["q1"], sa, False)[..., 0], _mlp(critic["q2"], sa, False)[..., 0]


def td_targets(agent: Agent, rewards, next_states, noise, config: Config = DEFAULT):
  """``r + γ (min_i Q̄_i(s', a') − α log π(a'|s'))``, ``a' ~ π(·|s')`` drawn with ``noise``
  (no terminal states)."""
  a_next, logp_next = act(agent.actor, next_states, noise)
  q1, q2 = q_values(agent.target, next_states, a_next)
  alpha = jnp.exp(agent.log_alpha)
  return jax.lax.stop_gradient(rewards + config.discount * (jnp.minimum(q1, q2)
                                                           - alpha * logp_next))


def critic_loss(critic: dict, states, actions, targets, weights):
  """``Σ_i weights_i ((Q1 − y)² + (Q2 − y)²)``: the official ``mse(Q1, y) + mse(Q2, y)`` when
  ``weights`` is ``1/n`` on the ``n`` rows drawn."""
  q1, q2 = q_values(critic, states, actions)
  return jnp.sum(weights * ((q1 - targets) ** 2 + (q2 - targets) ** 2))


def update_counts(size, capacity: int, updates: int, batch_size: int):
  """The official schedule, in exact integers: ``k = 1 + size / capacity``, then
  ``int(updates k / 2)`` gradient steps on minibatches of ``int(batch_size k / 2)`` rows."""
  size = jnp.asarray(size, jnp.int32)
  return ((updates * (capacity + size)) // (2 * capacity),
          (batch_size * (capacity + size)) // (2 * capacity))


def sac_step(agent: Agent, buffer: Buffer, rows, noise, num_rows,
             config: Config = DEFAULT) -> Agent:
  """One gradient step of the official ``SAC_Agent.train``: the critics on the TD error, then
  the actor on ``α log π − min(Q1, Q2)`` (with the updated critics), then ``log α`` on
  ``−log α (log π + target entropy)``, then the targets by Polyak averaging. The minibatch is
  the buffer's ``rows`` ``(B,)`` (:func:`draws`), of which the first ``num_rows`` count;
  ``noise`` ``(2, B, A)``: the policy's ``ε`` at ``s'`` (the TD target) and at ``s``."""
  s, a, r, s2 = (buffer.states[rows], buffer.actions[rows], buffer.rewards[rows],
                 buffer.next_states[rows])
  weights = (jnp.arange(rows.shape[0]) < num_rows) / jnp.maximum(num_rows, 1)
  adam = optax.adam(config.lr)

  y = td_targets(agent, r, s2, noise[0], config)
  grads = jax.grad(critic_loss)(agent.critic, s, a, y, weights)
  updates, critic_opt = adam.update(grads, agent.critic_opt, agent.critic)
  critic = optax.apply_updates(agent.critic, updates)

  alpha = jnp.exp(agent.log_alpha)
  def actor_loss(actor):
    action, logp = act(actor, s, noise[1])
    q1, q2 = q_values(critic, s, action)
    return jnp.sum(weights * (alpha * logp - jnp.minimum(q1, q2))), logp
  grads, logp = jax.grad(actor_loss, has_aux=True)(agent.actor)
  updates, actor_opt = adam.update(grads, agent.actor_opt, agent.actor)
  actor = optax.apply_updates(agent.actor, updates)

  target_entropy = -a.shape[-1]
  entropy_gap = jax.lax.stop_gradient(jnp.sum(weights * (logp + target_entropy)))
  grad = -entropy_gap  # d/d(log α) of −log α · mean(log π + target entropy)
  updates, alpha_opt = adam.update(grad, agent.alpha_opt, agent.log_alpha)
  log_alpha = optax.apply_updates(agent.log_alpha, updates)

  target = jax.tree_util.tree_map(lambda t, c: config.tau * c + (1 - config.tau) * t,
                                  agent.target, critic)
  return Agent(actor, critic, target, log_alpha, actor_opt, critic_opt, alpha_opt)


def draws(key, size, steps: int, action_dim: int, config: Config = DEFAULT):
  """The random draws of ``steps`` SAC steps: minibatch rows ``(steps, B)`` uniform over the
  ``size`` filled rows (with replacement, as ``torch.randint``) and the policy's noise
  ``(steps, 2, B, A)``, standard normal, both from one ``jax.random.uniform`` draw ``u``:
  ``floor(u size)`` and ``√2 erfinv(2u − 1)`` (``jax.random.normal``'s own transform)."""
  b = config.batch_size
  u = jax.random.uniform(key, (steps, b * (1 + 2 * action_dim)), minval=jnp.finfo(jnp.float32).tiny)
  size = jnp.maximum(size, 1)
  rows = jnp.minimum(jnp.floor(u[:, :b] * size).astype(jnp.int32), size - 1)
  noise = jnp.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * u[:, b:] - 1.0)
  return rows, noise.reshape(steps, 2, b, action_dim)


def train(agent: Agent, buffer: Buffer, key, updates: int, config: Config = DEFAULT) -> Agent:
  """The official ``train`` loop of one update round: :func:`update_counts` steps of
  :func:`sac_step` (``lax.fori_loop`` with a trip count read from the buffer's fill, at most
  ``updates``), their draws made first (:func:`draws`)."""
  capacity = buffer.rewards.shape[0]
  num_steps, num_rows = update_counts(buffer.size, capacity, updates, config.batch_size)
  rows, noise = draws(key, buffer.size, updates, buffer.actions.shape[-1], config)
  def body(i, agent):
    return sac_step(agent, buffer, rows[i], noise[i], num_rows, config)
  return jax.lax.fori_loop(0, num_steps, body, agent)
