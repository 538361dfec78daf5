"""Meta-level weighting: task weights learned from a meta (upper-level) objective.

Each method's :class:`~mtjax.weighting.base.MetaSpec` (``method.meta``) says what it learns
(``learned(state)``), how that gives the task weights of the lower-level step
(``weights(learned, state, losses)``) and its upper-level objective on the meta batch's task
losses; :mod:`mtjax.train.meta` computes the meta information (an exact meta-gradient through a
lookahead step, or FORUM's first-order quantities) and passes it to ``update`` as
``task_grads``. ``update`` is called with the train batch's ``losses`` and returns the new
weights (``combined = None``: the model's gradient is ``∇ Σ_t w_t L_t``) or, for FORUM, a
:class:`~mtjax.weighting.base.MetaDirection`. Called with ``task_grads=None``, ``update``
returns the current weights unchanged.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtjax.weighting import solvers
from mtjax.weighting.base import (
  TINY,
  MetaDirection,
  MetaSpec,
  Method,
  ValueFunctionInfo,
  adam_step,
  safe_div,
  safe_sqrt,
)


def _primary_mask(name, primary_tasks, num_tasks):
  if primary_tasks is not None and not all(0 <= i < num_tasks for i in primary_tasks):
    raise ValueError(f"{name}: 'primary_tasks' {primary_tasks} are not task indices "
                     f"in [0, {num_tasks})")
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  return (jnp.ones_like(zeros) if primary_tasks is None
          else zeros.at[jnp.asarray(primary_tasks)].set(1.0))


def _primary_objective(state, meta_losses):
  return jnp.sum(state.primary * meta_losses)


def _tree_adam(params, grads, mu, nu, count, lr):
  """:func:`adam_step` leaf by leaf on a pytree (one shared step count)."""
  out = jax.tree_util.tree_map(
      lambda p, g, m, v: adam_step(p, g.astype(jnp.float32), m, v, count, lr)[:3],
      params, grads, mu, nu)
  pick = lambda i: jax.tree_util.tree_map(  # noqa: E731
      lambda _, o: o[i], params, out, is_leaf=lambda x: isinstance(x, tuple))
  return pick(0), pick(1), pick(2), count + 1


# --- Auto-Lambda -----------------------------------------------------------------------------

class AutoLambdaState(NamedTuple):
  weights: jnp.ndarray
  primary: jnp.ndarray
  mu: jnp.ndarray
  nu: jnp.ndarray
  count: jnp.ndarray


AUTO_LAMBDA_SPEC = MetaSpec(learned=lambda state: state.weights,
                            weights=lambda learned, state, losses: learned,
                            objective=_primary_objective)


def auto_lambda(weight_init=0.1, meta_lr=1e-4, primary_tasks=None) -> Method:
  """Auto-Lambda (Liu, Johns & Davison, 2022): weights λ that minimise the meta loss.

  The meta loss is ``Σ_{i ∈ primary} L_i(θ'; meta batch)`` after one lookahead step
  ``θ' = θ − α ∇_θ Σ_t λ_t L_t(θ; train batch)`` (Eq. 3 of the paper); its gradient with
  respect to λ is computed exactly, second-order terms included, by
  :func:`mtjax.train.meta.meta_gradient` (the paper's code approximates it by finite
  differences). ``update`` takes that gradient as ``task_grads`` (shape ``(T,)``) and applies
  one Adam step to λ (``meta_lr=1e-4``, ``weight_init=0.1`` as in the official code); the
  returned weights then scale the task losses of the ordinary update. ``primary_tasks``: the
  indices of the tasks whose validation loss is the meta objective (None: all, the multi-task
  setting). Called with ``task_grads=None`` it returns the current weights unchanged.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    primary = _primary_mask("auto_lambda", primary_tasks, num_tasks)
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return AutoLambdaState(jnp.full((num_tasks,), weight_init, jnp.float32), primary, zeros,
                           zeros, jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses=None, key=None):
    del losses, key
    if task_grads is None:
      return None, state, state.weights
    meta_grad = jnp.asarray(task_grads, jnp.float32)
    weights, mu, nu, count = adam_step(state.weights, meta_grad, state.mu, state.nu,
                                       state.count, meta_lr)
    return None, AutoLambdaState(weights, state.primary, mu, nu, count), weights

  return Method(init, update, "meta", AUTO_LAMBDA_SPEC)


# --- a weighting network -----------------------------------------------------------------------

class WeightNetState(NamedTuple):
  params: Any            # φ: {"w1": (3, H), "b1": (H,), "w2": (H,), "b2": ()}
  mu: Any
  nu: Any
  count: jnp.ndarray
  first: jnp.ndarray     # (T,) the first step's losses
  average: jnp.ndarray   # (T,) exponential moving average of the past losses
  seen: jnp.ndarray      # steps whose losses are in ``first``/``average``
  primary: jnp.ndarray


def loss_features(state: WeightNetState, losses: jax.Array) -> jax.Array:
  """``(T, 3)`` features of each task's loss: ``log L_t``, ``log(L_t / L_t^first)`` (progress
  since the first step) and ``log(L_t / L̄_t)`` (the recent trend: against the moving average
  of the past losses). Before any step, ``first = L̄ = L`` (ratio and trend 0)."""
  losses = jnp.maximum(jnp.asarray(losses, jnp.float32), TINY)
  started = state.seen > 0
  first = jnp.where(started, state.first, losses)
  average = jnp.where(started, state.average, losses)
  log = jnp.log(losses)
  return jnp.stack([log, log - jnp.log(jnp.maximum(first, TINY)),
                    log - jnp.log(jnp.maximum(average, TINY))], axis=-1)


def weight_net_apply(params, features: jax.Array) -> jax.Array:
  """``λ = T softmax_t(w2 · tanh(W1ᵀ x_t + b1) + b2)``: one small MLP shared by the tasks
  (applied to each task's features), normalised over the tasks to sum to ``T`` (equal
  weighting's scale)."""
  hidden = jnp.tanh(features @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  return features.shape[0] * jax.nn.softmax(logits)


def _weight_net_weights(params, state, losses):
  return weight_net_apply(params, loss_features(state, losses))


WEIGHT_NET_SPEC = MetaSpec(learned=lambda state: state.params, weights=_weight_net_weights,
                           objective=_primary_objective)


def weight_net(hidden=16, meta_lr=1e-3, average_decay=0.9, primary_tasks=None,
               seed=0) -> Method:
  """mtjax's own method (no paper defines it): a weighting network learned by the exact
  meta-gradient of the validation loss.

  ``λ = net_φ(features)`` (:func:`weight_net_apply` on :func:`loss_features`: each task's
  current loss, its ratio to the first loss, its trend against a moving average with decay
  ``average_decay``). φ is learned as Auto-Lambda learns λ: the meta loss
  ``Σ_{i ∈ primary} L_i(θ'; meta batch)`` after the lookahead
  ``θ' = θ − α ∇_θ Σ_t net_φ(features)_t L_t(θ; train batch)`` is differentiated with respect
  to φ exactly, through the lookahead (:func:`mtjax.train.meta.meta_gradient`), and ``update``
  takes one Adam step on φ (``meta_lr``); the weights of the model update are then
  ``net_φ'(features)`` with the updated φ', after which the loss statistics take in this
  step's losses. This is the "meta-learning network that learns each task's weight" of the
  meta-weighting literature applied to multi-task losses (as Meta-Weight-Net, Shu et al. 2019,
  maps a sample's loss to its weight); no library offers it as such, so the defaults
  (``hidden = 16`` tanh units, ``meta_lr = 1e-3``, ``average_decay = 0.9``) are this
  library's choice, not a paper's. The first layer is drawn from ``PRNGKey(seed)`` (``init``
  takes no key), the output layer starts at zero so that λ starts at 1 (equal weighting).
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    primary = _primary_mask("weight_net", primary_tasks, num_tasks)
    w1 = jax.random.normal(jax.random.PRNGKey(seed), (3, hidden), jnp.float32) / jnp.sqrt(3.0)
    params = {"w1": w1, "b1": jnp.zeros((hidden,), jnp.float32),
              "w2": jnp.zeros((hidden,), jnp.float32), "b2": jnp.zeros((), jnp.float32)}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    losses = jnp.zeros((num_tasks,), jnp.float32)
    return WeightNetState(params, zeros, zeros, jnp.zeros((), jnp.int32), losses, losses,
                          jnp.zeros((), jnp.int32), primary)

  def update(task_grads, state, *, losses, key=None):
    del key
    if task_grads is None:
      return None, state, _weight_net_weights(state.params, state, losses)
    params, mu, nu, count = _tree_adam(state.params, task_grads, state.mu, state.nu,
                                       state.count, meta_lr)
    weights = _weight_net_weights(params, state, losses)
    current = jnp.maximum(jnp.asarray(losses, jnp.float32), TINY)
    started = state.seen > 0
    first = jnp.where(started, state.first, current)
    average = jnp.where(started, average_decay * state.average + (1 - average_decay) * current,
                        current)
    new = WeightNetState(params, mu, nu, count, first, average, state.seen + 1, state.primary)
    return None, new, weights

  return Method(init, update, "meta", WEIGHT_NET_SPEC)


# --- MOML --------------------------------------------------------------------------------------

class LogitState(NamedTuple):
  logits: jnp.ndarray  # α; the task weights are softmax(α)
  mu: jnp.ndarray
  nu: jnp.ndarray
  count: jnp.ndarray


def _softmax_weights(logits, state, losses):
  del state, losses
  return jax.nn.softmax(logits)


def _logit_init(num_tasks, grads_like=None):
  del grads_like
  zeros = jnp.zeros((num_tasks,), jnp.float32)
  # LibMTL's ``_prepare_tw``: the logits start at the constant 1/T (uniform weights 1/T).
  return LogitState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32), zeros, zeros,
                    jnp.zeros((), jnp.int32))


_MOML_NORMALIZATIONS = ("none", "l2")


def moml(outer_lr=1e-3, inner_lr=0.1, normalization="l2", num_iters=100) -> Method:
  """MOML, multi-objective meta learning (Ye et al., NeurIPS 2021).

  Bilevel: the lower level is ``ω*(α) = argmin_ω Σ_t softmax(α)_t L_t(ω; train batch)``,
  approximated by one SGD step of rate ``inner_lr`` from the current parameters; the upper
  level is the multi-objective problem ``min_α (F_1(ω*(α)), ..., F_T(ω*(α)))`` with ``F_i`` the
  task losses on the meta batch. Its T hypergradients ``∂F_i/∂α`` are computed exactly by
  :func:`mtjax.train.meta.meta_gradient` (the spec's vector objective: one ``jax.jacrev`` row
  per task, through the lookahead); ``update`` normalises each row (``normalization="l2"``, as
  the reference; ``"none"``), finds MGDA's min-norm weights ``s`` of the normalised rows
  (:func:`solvers.min_norm_weights`), takes one Adam step of rate ``outer_lr`` on α along
  ``Σ_i s_i ∂F_i/∂α`` (normalised), and returns ``softmax(α)`` (summing to 1) as the weights of
  the model update on the train batch.

  Follows LibMTL's ``Trainer.bacth_forward_MOML`` (``LibMTL/trainer.py``, one inner step, as it
  asserts), whose hypergradient ``−η ∇F_i(ω')ᵀ ∇_ω L(ω)ᵀ J_softmax(α)`` is the same exact
  quantity for one inner step, here by automatic differentiation. Defaults from LibMTL's
  ``config.py``: ``outer_lr = 1e-3`` (Adam on α), ``inner_lr = 0.1`` (``None``: the optimizer's
  current rate, as Auto-Lambda); α starts at the constant ``1/T``. Differences: the meta batch
  comes from ``config.meta_split`` (LibMTL draws the inner and outer batches as two half-size
  train batches and updates the model on a third, full batch; here the model update uses the
  train batch of the lookahead); an all-zero row is left at zero instead of dividing by its
  zero norm.
  """
  if normalization not in _MOML_NORMALIZATIONS:
    raise ValueError(f"moml: normalization={normalization!r}; allowed: {_MOML_NORMALIZATIONS}")

  def update(task_grads, state, *, losses=None, key=None):
    del losses, key
    if task_grads is None:
      return None, state, jax.nn.softmax(state.logits)
    jac = jnp.asarray(task_grads, jnp.float32)  # (T, T): row i = ∂F_i/∂α
    if normalization == "l2":
      norms = jnp.sqrt(jnp.sum(jnp.square(jac), axis=-1))
      jac = jac * safe_div(1.0, norms)[:, None]
    sol = solvers.min_norm_weights(jac @ jac.T, num_iters)
    logits, mu, nu, count = adam_step(state.logits, sol @ jac, state.mu, state.nu, state.count,
                                      outer_lr)
    weights = jax.nn.softmax(logits)
    return None, LogitState(logits, mu, nu, count), weights

  spec = MetaSpec(learned=lambda state: state.logits, weights=_softmax_weights,
                  objective=lambda state, meta_losses: meta_losses, lookahead_lr=inner_lr)
  return Method(_logit_init, update, "meta", spec)


# --- FORUM -------------------------------------------------------------------------------------

class ForumState(NamedTuple):
  logits: jnp.ndarray   # α; the lower-level task weights are softmax(α)
  mu: jnp.ndarray
  nu: jnp.ndarray
  count: jnp.ndarray
  lam: jnp.ndarray      # (T,) the moving average of the aggregation weights


def forum_qp(m: jax.Array, pi: jax.Array, c: jax.Array, num_iters: int = 200) -> jax.Array:
  """FORUM's aggregation problem on the ``(T+1, T+1)`` Gram matrix ``m`` of
  ``[ĝ_1, ..., ĝ_T, g_q]``: ``min_w wᵀ m w − c w_T`` subject to ``Σ_{t<T} w_t = 1``,
  ``w_T >= Σ_{t<T} π_t w_t``, ``w >= 0``. Returns ``w`` (``T + 1`` entries).

  For fixed ``u = w_{:T}`` the optimal ``w_T`` is closed-form: ``max(max(π·u, 0),
  (c − 2 m_{T,:T}·u) / (2 m_TT))``; the remaining convex problem in ``u`` over the simplex runs
  ``num_iters`` accelerated projected gradient steps in float32 (the reference solves the whole
  problem with cvxpy). ``m_TT`` gets ``1e-8`` (as ``c`` has in the reference) so the problem
  stays bounded when ``g_q = 0``.
  """
  m = solvers.symmetrize(m)
  t = m.shape[0] - 1
  a, b, d = m[:t, :t], m[:t, t], m[t, t] + 1e-8

  def last(u):
    return jnp.maximum(jnp.maximum(pi @ u, 0.0), (c - 2.0 * b @ u) / (2.0 * d))

  def objective(u):
    s = last(u)
    return u @ a @ u + 2.0 * s * (b @ u) + d * s * s - c * s

  p = jnp.concatenate([jnp.eye(t, dtype=jnp.float32), pi[None, :]], axis=0)
  curvature = 2.0 * solvers.lipschitz_bound(p.T @ m @ p + a)
  u0 = jnp.full((t,), 1.0 / t, jnp.float32)
  u = solvers._fista(jax.grad(objective), solvers.project_simplex, u0, 1.0 / curvature,
                     num_iters)
  u = jnp.where(objective(u) <= objective(u0), u, u0)
  return jnp.concatenate([u, last(u)[None]])


def forum(outer_lr=1e-3, inner_lr=0.1, inner_steps=5, phi=0.1, ema_period=1,
          num_iters=200) -> Method:
  """FORUM, a first-order multi-gradient method for multi-objective bilevel optimisation
  (Ye, Lin, Cao, Zhang & Tsang, ECAI 2024).

  The bilevel problem ``min_{α,ω} (F_1(ω), ..., F_T(ω))`` s.t. ``ω ∈ argmin f(α, ·)``, with
  ``f(α, ω) = Σ_t softmax(α)_t L_t(ω; train batch)`` and ``F_t`` the task losses on the meta
  batch, is rewritten with the value function as the constraint
  ``q(α, ω) = f(α, ω) − f(α, ω^K) <= 0``, ``ω^K`` being ``inner_steps`` SGD steps of rate
  ``inner_lr`` on ``f(α, ·)`` from ``ω`` (:func:`mtjax.train.meta.value_function_info`).
  Per step, in the joint space ``z = (α, ω)``: ``g_q = ∇_z q`` (its α part
  ``∇_α f(α, ω) − ∇_α f(α, ω^K)``, its ω part ``∇_ω f(α, ω)``), ``ĝ_t = (0, ∇_ω F_t /
  |∇_ω F_t|)``, ``π_t = φ − <g_q, ĝ_t> / (|g_q|² + 1e-8)``; the weights ``w`` of
  :func:`forum_qp` (``c = φ (|g_q|² + 1e-8)``) update the moving average
  ``λ ← λ + β_k (w_{:T} − λ)``, ``β_k = (k + 1)^{-3/4}``, ``k = ⌊updates / ema_period⌋``; then
  ``ν = max(λ·π, 0)`` and the joint direction is ``Σ_t λ_t ĝ_t + ν g_q``: α takes one Adam step
  of rate ``outer_lr`` along its α part, and the model's gradient is
  ``Σ_t (λ_t / |∇_ω F_t|) ∇_ω F_t + ν ∇_ω f`` (a :class:`MetaDirection`). The logged weights
  are ``softmax(α)`` after the step, the learned lower-level task weights.

  First-order by design, as the paper: no derivative through the inner steps. Follows LibMTL's
  ``Trainer.bacth_forward_FORUM`` (``LibMTL/trainer.py``); defaults from its ``config.py``:
  ``FORUM_phi = 0.1``, ``inner_lr = 0.1`` (``None``: the optimizer's current rate),
  ``inner_step = 5``, ``outer_lr = 1e-3`` (Adam on α, which starts at the constant ``1/T``).
  Differences: LibMTL indexes ``β`` by the *epoch* (``ema_period`` = the steps per epoch
  reproduces it; the default 1 indexes it by train step, this library's choice, as a method
  does not see epochs); its QP goes to cvxpy, this one to
  :func:`forum_qp`; an all-zero ``∇_ω F_t`` gets ``ĝ_t = 0`` instead of a division by zero.
  As LibMTL (two half-size train batches per step), the lower-level and the meta batch are the
  two halves of one train batch (``MetaSpec.trains_on_meta``: the model moves along the meta
  batch's gradients, so each step sees ``batch_size`` examples, as every other method, and
  ``config.meta_split="validation"`` is refused); the BatchNorm statistics the step keeps are
  the lower-level half's (LibMTL's model also runs the meta half in train mode).
  """
  if inner_steps < 1 or ema_period < 1:
    raise ValueError(f"forum: inner_steps={inner_steps!r} and ema_period={ema_period!r} must "
                     "be >= 1")

  def init(num_tasks, grads_like=None):
    state = _logit_init(num_tasks, grads_like)
    return ForumState(*state, jnp.zeros((num_tasks,), jnp.float32))

  def update(task_grads, state, *, losses=None, key=None):
    del losses, key
    if task_grads is None:
      return None, state, jax.nn.softmax(state.logits)
    info: ValueFunctionInfo = task_grads
    gap = info.losses - info.inner_losses
    alpha_gap = jax.grad(lambda a: jax.nn.softmax(a) @ gap)(state.logits)
    inv = safe_div(1.0, safe_sqrt(jnp.diag(info.meta_gram)))
    gf_gram = solvers.symmetrize(info.meta_gram) * inv[:, None] * inv[None, :]
    gf_gq = info.cross * inv
    gq_sq = alpha_gap @ alpha_gap + info.inner_sq
    pi = phi - gf_gq / (gq_sq + 1e-8)
    c = phi * (gq_sq + 1e-8)
    t = gap.shape[0]
    m = jnp.zeros((t + 1, t + 1), jnp.float32)
    m = m.at[:t, :t].set(gf_gram).at[:t, t].set(gf_gq).at[t, :t].set(gf_gq).at[t, t].set(gq_sq)
    w = forum_qp(m, pi, c, num_iters)
    k = (state.count // ema_period).astype(jnp.float32)
    lam = state.lam + (k + 1.0) ** -0.75 * (w[:t] - state.lam)
    nu = jnp.maximum(lam @ pi, 0.0)
    direction = MetaDirection(train=nu * jax.nn.softmax(state.logits), meta=lam * inv)
    logits, mu, nu_adam, count = adam_step(state.logits, nu * alpha_gap, state.mu, state.nu,
                                           state.count, outer_lr)
    weights = jax.nn.softmax(logits)
    return direction, ForumState(logits, mu, nu_adam, count, lam), weights

  spec = MetaSpec(learned=lambda state: state.logits, weights=_softmax_weights,
                  objective=lambda state, meta_losses: meta_losses, kind="value_function",
                  lookahead_lr=inner_lr, inner_steps=inner_steps, trains_on_meta=True)
  return Method(init, update, "meta", spec)


METHODS = {"auto_lambda": auto_lambda, "weight_net": weight_net, "moml": moml, "forum": forum}
