"""Loss-level weighting: the weights come from the losses alone (one backward pass).

For a method whose objective is a function ``F(L_1, ..., L_T)`` of the losses (GLS, FAMO, STCH,
IGB), the returned weights are its gradient ``∂F/∂L_t`` at the current losses, so that the train
step's ``Σ_t w_t L_t`` (weights held constant) has the gradient of ``F``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax.weighting import sac
from mtjax.weighting.base import (
  TINY,
  EmptyState,
  Method,
  adam_step,
  combine_or_none,
  stateless_init,
)


def ew() -> Method:
  """Equal weighting (linear scalarisation): ``L = Σ_t L_t``, every weight 1."""
  init = stateless_init

  def update(task_grads, state, *, losses, key=None):
    del key
    weights = jnp.ones_like(jnp.asarray(losses, jnp.float32))
    return combine_or_none(task_grads, weights), state, weights

  return Method(init, update, "loss")


def fixed(weights=None) -> Method:
  """Fixed task weights ``L = Σ_t λ_t L_t``; ``weights=None`` means all ones (equal weights)."""
  def init(num_tasks, grads_like=None):
    del grads_like
    if weights is not None and len(weights) != num_tasks:
      raise ValueError(f"fixed: 'weights' has {len(weights)} entries, expected one per task "
                       f"({num_tasks})")
    return EmptyState()

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    w = jnp.ones_like(losses) if weights is None else jnp.asarray(weights, jnp.float32)
    return combine_or_none(task_grads, w), state, w

  return Method(init, update, "loss")


class UWState(NamedTuple):
  """Uncertainty weighting: the learnable log-variances ``s_t = log σ_t²``."""

  log_vars: jax.Array


def uw(lr: float = 0.025, init_log_var: float = -0.5) -> Method:
  """Uncertainty weighting (Kendall, Gal & Cipolla, 2018, Eq. 7 in LibMTL's form).

  Objective ``Σ_t L_t / (2σ_t²) + log σ_t`` with ``s_t = log σ_t²``, i.e.
  ``Σ_t exp(-s_t) L_t / 2 + s_t / 2`` (the regression form, used for every task as in LibMTL's
  ``UW.py``). The effective weights are ``w_t = exp(-s_t) / 2``. Inside ``update`` the
  log-variances take one plain gradient step on that objective at the current losses:
  ``s_t ← s_t - lr (1/2 - exp(-s_t) L_t / 2)``; the returned weights are those before the step
  (the network and the ``s_t`` see the same objective, as when both are trained jointly).

  Defaults: ``init_log_var=-0.5`` as LibMTL; ``lr=0.025`` is the ``--method-params-lr``
  default of the Nash-MTL/FAMO code, where UW's parameters are trained with Adam — here the
  step is plain gradient descent.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    return UWState(jnp.full((num_tasks,), init_log_var, jnp.float32))

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    weights = 0.5 * jnp.exp(-state.log_vars)
    grad = 0.5 - weights * losses
    new_state = UWState(state.log_vars - lr * grad)
    return combine_or_none(task_grads, weights), new_state, weights

  return Method(init, update, "loss")


class DWAState(NamedTuple):
  """Dynamic weight average: the last two recorded (period-averaged) loss vectors."""

  history: jax.Array      # (2, T): [older, newer]
  num_records: jax.Array  # int32, saturates at 2
  loss_sum: jax.Array     # (T,): losses summed over the current period
  count: jax.Array        # int32: calls in the current period


def dwa(temperature: float = 2.0, period: int = 1) -> Method:
  """Dynamic weight average (Liu, Johns & Davison, 2019, Eq. 1).

  ``w_t = T exp(r_t / temperature) / Σ_k exp(r_k / temperature)`` with
  ``r_t = L_t(e-1) / L_t(e-2)``, the ratio of the last two recorded losses; equal weights until
  two records exist. A record is the mean loss over ``period`` consecutive calls: the official
  code and LibMTL average over an epoch (``period = steps per epoch``); the default ``period=1``
  uses the last two steps. Weights sum to ``T``. ``temperature=2`` as in the paper.
  """
  if period < 1:
    raise ValueError(f"dwa: 'period' must be >= 1, got {period}")

  def init(num_tasks, grads_like=None):
    del grads_like
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return DWAState(jnp.zeros((2, num_tasks), jnp.float32), jnp.zeros((), jnp.int32), zeros,
                    jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    num_tasks = losses.shape[0]
    older, newer = state.history[0], state.history[1]
    ratio = newer / jnp.maximum(older, TINY)
    dynamic = num_tasks * jax.nn.softmax(ratio / temperature)
    weights = jnp.where(state.num_records >= 2, dynamic, jnp.ones_like(losses))

    loss_sum = state.loss_sum + losses
    count = state.count + 1
    full = count >= period
    history = jnp.where(full, jnp.stack([newer, loss_sum / period]), state.history)
    new_state = DWAState(
        history,
        jnp.where(full, jnp.minimum(state.num_records + 1, 2), state.num_records),
        jnp.where(full, jnp.zeros_like(loss_sum), loss_sum),
        jnp.where(full, 0, count).astype(jnp.int32))
    return combine_or_none(task_grads, weights), new_state, weights

  return Method(init, update, "loss")


def rlw() -> Method:
  """Random loss weighting (Lin et al., 2022, Sec. 3): ``w = softmax(ε)``, ``ε ~ N(0, I_T)``.

  A fresh draw from ``key`` at every call; the weights are positive and sum to 1 (the
  softmax-normalised normal variant, RLW's default in the paper and in LibMTL).
  """
  init = stateless_init

  def update(task_grads, state, *, losses, key=None):
    if key is None:
      raise ValueError("rlw: 'key' is required (the random weights are drawn from it)")
    losses = jnp.asarray(losses, jnp.float32)
    weights = jax.nn.softmax(jax.random.normal(key, losses.shape, jnp.float32))
    return combine_or_none(task_grads, weights), state, weights

  return Method(init, update, "loss")


def gls(eps: float = 1e-8) -> Method:
  """Geometric loss strategy (Chennupati et al., 2019, Eq. 3): ``L = (Π_t L_t)^{1/T}``.

  The effective weights are the derivative of the geometric mean,
  ``w_t = ∂L/∂L_t = L / (T L_t)``, computed in log space from the losses clamped at ``eps``
  (so a zero loss gives a large but finite weight). (LibMTL's ``GLS.py`` logs
  ``L_t / (T Π L)``, which is not this derivative; its backward pass is.)
  """
  init = stateless_init

  def update(task_grads, state, *, losses, key=None):
    del key
    safe = jnp.maximum(jnp.asarray(losses, jnp.float32), eps)
    log_safe = jnp.log(safe)
    # w_t = exp(mean(log L) - log L_t) / T, without forming the product.
    weights = jnp.exp(jnp.mean(log_safe) - log_safe) / safe.shape[0]
    return combine_or_none(task_grads, weights), state, weights

  return Method(init, update, "loss")


class FAMOState(NamedTuple):
  """FAMO: task logits with their Adam moments, the previous call's losses, ``min_losses``."""

  logits: jax.Array       # (T,)
  mu: jax.Array           # (T,) Adam first moment
  nu: jax.Array           # (T,) Adam second moment
  count: jax.Array        # int32: Adam steps taken
  prev_losses: jax.Array  # (T,)
  has_prev: jax.Array     # bool: prev_losses holds a real loss vector
  min_losses: jax.Array   # (T,) lower bounds L*_t (zeros, as the official code's default)


def famo(w_lr: float = 0.025, gamma: float = 1e-3) -> Method:
  """Fast adaptive multitask optimization (Liu et al., 2023, Alg. 1).

  Weighted loss ``Σ_t z_t log(L_t - L*_t + 1e-8) / c`` with ``z = softmax(logits)`` and
  ``c = Σ_t z_t / (L_t - L*_t + 1e-8)`` (a constant), so the effective weights are
  ``w_t = z_t / (c (L_t - L*_t + 1e-8))`` and sum to 1.

  The logits follow FAMO's update: with ``δ_t = log(L_t^prev - L*_t + 1e-8) -
  log(L_t - L*_t + 1e-8)``, their gradient is ``J_softmax^T δ`` and they take one Adam step
  (β = (0.9, 0.999), ε = 1e-8) with L2 weight decay ``gamma`` (PyTorch's coupled
  ``weight_decay``), learning rate ``w_lr``. Difference from the official code: there ``δ`` is
  the change of the same batch's losses before and after the parameter step (one extra
  forward); the contract gives one loss vector per call, so here ``δ`` compares the previous
  call's losses with the current ones (consecutive batches), and the step is taken at the
  start of the call, before the weights are formed. The first call takes no step.

  Defaults ``w_lr=0.025`` (official code and LibMTL), ``gamma=1e-3`` (LibMTL's
  ``FAMO_w_gamma``; the official ``famo.py`` defaults to 0.01). ``min_losses`` is zero; set it
  with ``state._replace(min_losses=...)``.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(zeros, zeros, zeros, jnp.zeros((), jnp.int32), zeros,
                     jnp.zeros((), jnp.bool_), zeros)

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    gap = jnp.maximum(losses - state.min_losses, 0.0) + 1e-8
    prev_gap = jnp.maximum(state.prev_losses - state.min_losses, 0.0) + 1e-8
    delta = jnp.log(prev_gap) - jnp.log(gap)
    z = jax.nn.softmax(state.logits)
    grad = z * (delta - jnp.dot(z, delta)) + gamma * state.logits  # J_softmax^T δ + L2 decay
    logits, mu, nu, count = adam_step(state.logits, grad, state.mu, state.nu, state.count,
                                       w_lr)
    keep = state.has_prev
    logits = jnp.where(keep, logits, state.logits)
    mu = jnp.where(keep, mu, state.mu)
    nu = jnp.where(keep, nu, state.nu)
    count = jnp.where(keep, count, state.count)

    z = jax.nn.softmax(logits)
    scaled = z / gap
    weights = scaled / jnp.sum(scaled)
    new_state = FAMOState(logits, mu, nu, count, losses, jnp.ones((), jnp.bool_),
                          state.min_losses)
    return combine_or_none(task_grads, weights), new_state, weights

  return Method(init, update, "loss")


class ReferenceLossState(NamedTuple):
  """A reference loss vector averaged over a window of calls (STCH's nadir point, IGB's base
  losses) and the call counter."""

  step: jax.Array       # int32: calls so far
  loss_sum: jax.Array   # (T,): losses summed over the window so far
  reference: jax.Array  # (T,): the window's mean, valid once step >= start + length


def _reference_init(num_tasks, grads_like=None) -> ReferenceLossState:
  del grads_like
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  return ReferenceLossState(jnp.zeros((), jnp.int32), zeros, zeros)


def _reference_update(state, losses, start, length):
  """``(ready, new_state)``: ``ready`` says whether ``state.reference`` is the mean of the losses
  of calls ``start, ..., start + length - 1`` (all before this one); this call's losses are
  added to the window when it falls inside."""
  step = state.step
  ready = step >= start + length
  inside = (step >= start) & (step < start + length)
  loss_sum = state.loss_sum + jnp.where(inside, losses, 0.0)
  reference = jnp.where(step == start + length - 1, loss_sum / length, state.reference)
  return ready, ReferenceLossState(step + 1, loss_sum, reference)


def _check_window(name, warmup_steps, window_name, window):
  if warmup_steps < 0 or window < 1:
    raise ValueError(f"{name}: warmup_steps={warmup_steps!r} must be >= 0 and "
                     f"{window_name}={window!r} >= 1")


def stch_weights(losses, nadir, mu, pref):
  """``∂F/∂L_t`` of the smooth Tchebycheff objective of the official MTL code (Lin et al., 2024, the
  smooth Tchebycheff function on log-normalised losses): ``F = T μ log Σ_t exp(λ_t ℓ_t / μ)`` with
  ``ℓ_t = log(L_t / z_t + 1e-20)``, i.e. ``w_t = T softmax(λ ℓ / μ)_t λ_t / (L_t + 1e-20 z_t)``."""
  num_tasks = losses.shape[0]
  ell = pref * jnp.log(losses / nadir + 1e-20)
  return num_tasks * jax.nn.softmax(ell / mu) * pref / (losses + 1e-20 * nadir)


def stch(mu: float = 1.0, warmup_steps: int = 0, nadir_steps: int = 1,
         pref_vector=None) -> Method:
  """Smooth Tchebycheff scalarisation, STCH (Lin et al., 2024).

  The Tchebycheff scalarisation ``max_t λ_t (f_t - z_t)`` smoothed by ``μ``:
  ``g_μ = μ log Σ_t exp(λ_t (f_t - z_t) / μ)``, which lies in
  ``[max_t λ_t (f_t - z_t), max_t λ_t (f_t - z_t) + μ log T]`` and tends to it as ``μ → 0``.
  As the official MTL code (Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``, also LibMTL's
  ``STCH``): ``f_t - z_t`` is ``ℓ_t = log(L_t / z_t + 1e-20)`` with the nadir point ``z`` the mean
  loss of a warm-up window, and the objective is multiplied by ``T``; the weights are
  :func:`stch_weights`. Until the nadir exists (the first ``warmup_steps + nadir_steps`` calls)
  the objective is ``Σ_t log(L_t + 1e-20)`` (weights ``1 / (L_t + 1e-20)``), and the losses of
  the last ``nadir_steps`` of those calls are averaged into ``z``.

  Defaults: ``mu = 1.0`` (the official ``--STCH_mu``). The official code warms up for 4 epochs
  and averages the 5th (``--STCH_warmup_epoch 4``); calls are not epochs here, so the defaults
  ``warmup_steps = 0, nadir_steps = 1`` take the first call's losses as the nadir — set
  ``warmup_steps = 4 E, nadir_steps = E`` for ``E`` steps per epoch to match. ``pref_vector``
  (the paper's ``λ``; ``None`` = all ones, as the official code) must have one entry per task.
  """
  if mu <= 0:
    raise ValueError(f"stch: mu={mu!r} must be > 0")
  _check_window("stch", warmup_steps, "nadir_steps", nadir_steps)

  def init(num_tasks, grads_like=None):
    if pref_vector is not None and len(pref_vector) != num_tasks:
      raise ValueError(f"stch: 'pref_vector' has {len(pref_vector)} entries, expected one per "
                       f"task ({num_tasks})")
    return _reference_init(num_tasks, grads_like)

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    pref = (jnp.ones_like(losses) if pref_vector is None
            else jnp.asarray(pref_vector, jnp.float32))
    ready, new_state = _reference_update(state, losses, warmup_steps, nadir_steps)
    nadir = jnp.maximum(state.reference, 1e-20)
    weights = jnp.where(ready, stch_weights(losses, nadir, mu, pref), 1.0 / (losses + 1e-20))
    return combine_or_none(task_grads, weights), new_state, weights

  return Method(init, update, "loss")


def igb_v1(warmup_steps: int = 1, base_steps: int = 1) -> Method:
  """Improvable gap balancing, IGBv1 (Dai, Fei & Lu, 2023; official code
  YanqiDai/IGB4MTL, ``ImprovableGapBalancing_v1``).

  Objective ``Σ_t v_t log L_t`` with ``v = T softmax(L / L_base)`` held constant (the improvable
  gap of task ``t`` is measured by ``L_t / L_base,t``, the loss relative to a base-epoch
  average), so the effective weights are ``w_t = v_t / L_t``. Before the base losses exist
  ``v = 1`` (``Σ_t log L_t``). ``L_base`` is the mean loss of calls ``warmup_steps, ...,
  warmup_steps + base_steps - 1``; the official code averages epoch ``--base_epoch 1`` (the
  second), i.e. ``warmup_steps = base_steps = E`` for ``E`` steps per epoch; the defaults
  ``1, 1`` are that with one step per "epoch". ``log L`` is guarded as ``1 / (L + 1e-20)``.
  IGBv2, whose ``v`` a soft actor-critic agent learns, is :func:`igb`.
  """
  _check_window("igb_v1", warmup_steps, "base_steps", base_steps)

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    num_tasks = losses.shape[0]
    ready, new_state = _reference_update(state, losses, warmup_steps, base_steps)
    base = jnp.maximum(state.reference, 1e-20)
    v = jnp.where(ready, num_tasks * jax.nn.softmax(losses / base), 1.0)
    weights = v / (losses + 1e-20)
    return combine_or_none(task_grads, weights), new_state, weights

  return Method(_reference_init, update, "loss")


class IGBv2State(NamedTuple):
  """IGBv2: the base-loss window (its ``step`` counts the calls), the previous call's losses
  and action, the replay buffer and the soft actor-critic agent."""

  base: ReferenceLossState
  prev_losses: jax.Array   # (T,)
  prev_action: jax.Array   # (T,) the v of the previous call
  buffer: sac.Buffer
  agent: sac.Agent


def igb(steps_per_epoch: int = 1, base_epoch: int = 1, start_epoch: int = 5,
        update_after: int = 3, update_every: int = 50, buffer_size: int = 10000,
        sac_lr: float = 3e-4, batch_size: int = 256, hidden: int = 128, discount: float = 0.99,
        tau: float = 0.005, init_alpha: float = 0.2, reward_scale: float = 1.0,
        seed: int = 0) -> Method:
  """Improvable gap balancing, IGBv2 (Dai, Fei & Lu, 2023, Sec. 4.2; official code
  YanqiDai/IGB4MTL, ``ImprovableGapBalancing_v2`` and ``methods/SAC_Agent.py``).

  The objective is IGBv1's ``Σ_t v_t log L_t`` (effective weights ``w_t = v_t / L_t``), but
  ``v = T softmax(u)`` is the action of a soft actor-critic agent (:mod:`mtjax.weighting.sac`)
  whose state is the batch's loss vector ``L``. After each call the transition
  ``(L_prev, v_prev, r, L)`` goes into a replay buffer, with the reward
  ``r = reward_scale · min_t (L_prev,t − L_t) / L_base,t``, the smallest relative loss
  decrease: the improvable gap of the task that improved least. As in the official code, per
  call ``c`` (0-based; ``E = steps_per_epoch``): transitions are stored once the base losses
  exist (``L_base``: the mean loss of epoch ``base_epoch``, calls ``[base_epoch E,
  (base_epoch + 1) E)``); when ``c >= update_after E`` and ``c % update_every == 0`` the agent
  runs ``int(update_every k / 2)`` SAC steps on minibatches of ``int(batch_size k / 2)``
  transitions, ``k = 1 + fill / buffer_size`` (:func:`sac.train`); ``v`` is
  ``T softmax(ε)``, ``ε ~ N(0, I)``, for ``c < start_epoch E`` and a sample of the actor at
  ``L`` after that. ``v`` is positive and sums to ``T``.

  Defaults: the official code's (``--base_epoch 1``, ``start_epoch = 5``,
  ``update_after = 3``, ``update_every = 50``, ``--buffer_size 1e4``, ``--sac_lr 3e-4``,
  ``batch_size = 256``, ``hid_shape = (128, 128)``, ``gamma = 0.99``, ``tau = 0.005``,
  ``alpha = 0.2`` adaptive with target entropy ``−T``). The official trainer counts epochs of
  ``E = len(train_loader)`` steps; ``steps_per_epoch = 1`` (default, as :func:`igb_v1`'s
  windows) makes every epoch one call: set it to the epoch length for the official schedule.
  It also sets ``reward_scale`` to ``lr₀ / lr`` every epoch, which is ``1`` under a constant
  learning rate. The networks start from ``PRNGKey(seed)`` (``init`` takes no key); every draw
  of ``update`` comes from its ``key``.
  """
  if steps_per_epoch < 1 or base_epoch < 0 or min(start_epoch, update_after) < 0:
    raise ValueError(f"igb: steps_per_epoch={steps_per_epoch!r} must be >= 1 and base_epoch="
                     f"{base_epoch!r}, start_epoch={start_epoch!r}, update_after="
                     f"{update_after!r} >= 0")
  if min(update_every, buffer_size, batch_size, hidden) < 1:
    raise ValueError(f"igb: update_every={update_every!r}, buffer_size={buffer_size!r}, "
                     f"batch_size={batch_size!r} and hidden={hidden!r} must be >= 1")
  config = sac.Config(hidden, sac_lr, discount, tau, init_alpha, batch_size)
  epoch = steps_per_epoch

  def init(num_tasks, grads_like=None):
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return IGBv2State(_reference_init(num_tasks, grads_like), zeros, zeros,
                      sac.buffer_init(buffer_size, num_tasks, num_tasks),
                      sac.agent_init(jax.random.PRNGKey(seed), num_tasks, num_tasks, config))

  def update(task_grads, state, *, losses, key):
    losses = jnp.asarray(losses, jnp.float32)
    num_tasks = losses.shape[0]
    call = state.base.step
    ready, base = _reference_update(state.base, losses, base_epoch * epoch, epoch)
    gap = (state.prev_losses - losses) / jnp.maximum(state.base.reference, 1e-20)
    reward = reward_scale * jnp.min(gap)
    buffer = sac.buffer_add(state.buffer, state.prev_losses, state.prev_action, reward, losses,
                            write=ready)
    k_train, k_draw = jax.random.split(key)
    train = (call >= update_after * epoch) & (call % update_every == 0) & (buffer.size > 0)
    agent = jax.lax.cond(train, lambda a: sac.train(a, buffer, k_train, update_every, config),
                         lambda a: a, state.agent)
    normal = jax.random.normal(k_draw, (2, num_tasks))  # the random v's logits, the actor's ε
    random_v = num_tasks * jax.nn.softmax(normal[0])
    actor_v, _ = sac.act(agent.actor, losses, normal[1])
    v = jax.lax.stop_gradient(jnp.where(call < start_epoch * epoch, random_v, actor_v))
    weights = v / (losses + 1e-20)
    return (combine_or_none(task_grads, weights), IGBv2State(base, losses, v, buffer, agent),
            weights)

  return Method(init, update, "loss")


class GO4AlignState(NamedTuple):
  """GO4Align: the risk-guided indicator distribution ``p`` (on the simplex)."""

  probs: jax.Array  # (T,)


def kmeans_1d(x: jax.Array, num_groups: int) -> jax.Array:
  """Exact 1-D k-means: each entry of ``x`` replaced by the mean of its group, for the partition
  into ``num_groups`` groups of minimal within-group sum of squares (Bellman's dynamic programme
  over the sorted values, whose optimal groups are contiguous; ``O(K T²)``)."""
  x = jnp.asarray(x, jnp.float32)
  t = x.shape[0]
  k = min(num_groups, t)
  if k <= 1:
    return jnp.full_like(x, jnp.mean(x))
  if k == t:
    return x
  order = jnp.argsort(x)
  xs = x[order]
  idx = jnp.arange(t)
  # cost[i, j]: sum of squares of xs[i..j] about its mean (inf for i > j).
  inside = (idx[None, :, None] <= idx[None, None, :]) & (idx[None, :, None] >= idx[:, None, None])
  inside = inside.transpose(0, 2, 1)  # [i, j, m]: i <= m <= j
  count = jnp.maximum(jnp.sum(inside, -1), 1)
  mean = jnp.sum(inside * xs, -1) / count
  cost = jnp.sum(inside * (xs[None, None, :] - mean[..., None]) ** 2, -1)
  cost = jnp.where(idx[:, None] <= idx[None, :], cost, jnp.inf)
  best = cost[0]  # best[j]: one group over xs[0..j]
  starts = []
  for _ in range(1, k):
    # new[j] = min_{1 <= i <= j} best[i - 1] + cost[i, j]
    prev = jnp.concatenate([jnp.full((1,), jnp.inf), best[:-1]])
    total = prev[:, None] + cost
    starts.append(jnp.argmin(total, axis=0))
    best = jnp.min(total, axis=0)
  end = t - 1
  first = []
  for s in reversed(starts):  # backtrack the start of each group but the first
    i = s[end]
    first.append(i)
    end = i - 1
  group = sum((idx >= i).astype(jnp.int32) for i in first)
  one_hot = (group[:, None] == jnp.arange(k)[None, :]).astype(jnp.float32)
  centers = (one_hot.T @ xs) / jnp.maximum(one_hot.sum(0), 1.0)
  return jnp.zeros_like(x).at[order].set(one_hot @ centers)


def go4align(num_groups: int = 1, robust_step_size: float = 1e-4) -> Method:
  """GO4Align, group optimization for multi-task alignment (Shen et al., 2024; official code
  autumn9999/GO4Align, ``GO4ALIGN`` in ``methods/cluster_methods.py``).

  Risk-guided group indicators: ``p ← p ⊙ exp(-η L) / Σ(·)`` (``p`` starts uniform) and
  ``γ_t = (Σ_k L_k / L_t) p_t``; dynamical group assignment: the ``γ_t`` are clustered into
  ``num_groups`` groups by k-means and every task gets its group's mean ``γ`` as its weight on
  ``L_t``. The official code runs Lloyd's k-means (``kmeans_pytorch``, random initial centres)
  on the 1-D ``γ``; here :func:`kmeans_1d` finds the exact optimum of the same k-means objective
  (deterministic). ``num_groups = 1`` gives every task ``mean_t γ_t``; ``num_groups >= T`` gives
  ``γ`` itself. A zero loss is guarded as ``Σ_k L_k / max(L_t, 1e-20)``.

  Defaults: ``robust_step_size = 1e-4`` and ``num_groups = 1``, the defaults of the official
  NYUv2 trainer (``--robust_step_size``, ``--num_groups``); with one group the weights are equal
  (their common value adapts), so set ``num_groups >= 2`` for the grouping of the paper.
  """
  if num_groups < 1:
    raise ValueError(f"go4align: num_groups={num_groups!r} must be >= 1")

  def init(num_tasks, grads_like=None):
    del grads_like
    return GO4AlignState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    # p ⊙ exp(-η L) / Σ(·) in log space: exp(-η L) underflows to 0 for every task at large L.
    probs = jax.nn.softmax(jnp.log(state.probs) - robust_step_size * losses)
    gamma = jnp.sum(losses) / jnp.maximum(losses, 1e-20) * probs
    weights = kmeans_1d(gamma, num_groups)
    return combine_or_none(task_grads, weights), GO4AlignState(probs), weights

  return Method(init, update, "loss")


METHODS = {"ew": ew, "fixed": fixed, "uw": uw, "dwa": dwa, "rlw": rlw, "gls": gls, "famo": famo,
           "stch": stch, "go4align": go4align, "igb": igb, "igb_v1": igb_v1}
