"""Loss-level weighting: the weights come from the losses alone (one backward pass)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax.weighting.base import EmptyState, Method, adam_step, combine_or_none, stateless_init

_TINY = 1e-12


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
    ratio = newer / jnp.maximum(older, _TINY)
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


METHODS = {"ew": ew, "fixed": fixed, "uw": uw, "dwa": dwa, "rlw": rlw, "gls": gls, "famo": famo}
