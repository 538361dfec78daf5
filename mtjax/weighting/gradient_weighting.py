"""Gradient-level weighting: the task weights come from the per-task gradients.

GradNorm learns weights from the gradient norms, IMTL-G solves for weights that give equal
projections onto every task's unit gradient, DB-MTL rescales (averaged) log-loss gradients
to a common norm, and ExcessMTL up-weights the tasks with the larger estimated excess risk.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtjax.weighting.base import (
  TINY,
  Method,
  adam_step,
  gram_method,
  num_tasks_of,
  safe_sqrt,
  stateless_init,
  weighted_sum,
)


def _task_sq_norms(task_grads) -> jax.Array:
  """``(T,)`` squared norms ``||g_t||²``, leaf by leaf (the diagonal of the Gram matrix)."""
  def leaf(g):
    g = g.reshape(g.shape[0], -1).astype(jnp.float32)
    return jnp.sum(jnp.square(g), axis=1)
  return sum(leaf(g) for g in jax.tree_util.tree_leaves(task_grads))


def _per_task_zeros(name: str, purpose: str, num_tasks: int, grads_like):
  """float32 zeros with a leading task axis, shaped like ``grads_like`` (required)."""
  if grads_like is None:
    raise ValueError(f"{name}: 'grads_like' (one task's gradient pytree) is required by init "
                     f"to allocate {purpose}")
  return jax.tree_util.tree_map(
      lambda x: jnp.zeros((num_tasks,) + tuple(jnp.shape(x)), jnp.float32), grads_like)


def _cast_like(combined, task_grads):
  return jax.tree_util.tree_map(lambda c, g: c.astype(g.dtype), combined, task_grads)


class GradNormState(NamedTuple):
  """GradNorm: the learnable weights, ``L_t(0)``, and the weights' Adam moments."""

  weights: jax.Array         # (T,), sums to T
  initial_losses: jax.Array  # (T,), recorded at the first call
  mu: jax.Array
  nu: jax.Array
  count: jax.Array           # int32: calls so far


def gradnorm(alpha: float = 1.5, lr: float = 0.025) -> Method:
  """GradNorm (Chen et al., 2018, Eqs. 1-2 and Alg. 1).

  With ``G_t = ||w_t g_t||`` (norms of the given gradients), ``Ḡ = mean_t G_t``, the inverse
  training rates ``r_t = L̃_t / mean_k L̃_k`` with ``L̃_t = L_t / L_t(0)`` (``L_t(0)``: the
  losses at the first call), the weights take one Adam step on
  ``L_grad = Σ_t |G_t - Ḡ r_t^α|`` with the target ``Ḡ r_t^α`` held constant
  (``∂L_grad/∂w_t = sign(G_t - Ḡ r_t^α) ||g_t||``), and are then renormalised to
  ``Σ_t w_t = T`` (kept positive). ``combined = Σ_t w_t g_t`` uses the weights before the step.

  Defaults: ``alpha=1.5`` (paper's NYUv2 setting, LibMTL default). The weights' optimiser is
  Adam with ``lr=0.025`` (the weight learning rate of the AuxiLearn/Nash-MTL code); LibMTL
  instead trains softmax-parameterised weights with the model's own optimiser.
  """
  def init(num_tasks, grads_like=None):
    del grads_like
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return GradNormState(jnp.ones((num_tasks,), jnp.float32), zeros, zeros, zeros,
                         jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    num_tasks = losses.shape[0]
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    w = state.weights
    norms = safe_sqrt(_task_sq_norms(task_grads))
    g_norm = w * norms
    ratio = losses / jnp.maximum(initial, TINY)
    inv_rate = ratio / jnp.maximum(jnp.mean(ratio), TINY)
    target = jnp.mean(g_norm) * inv_rate ** alpha
    grad = jnp.sign(g_norm - target) * norms

    new_w, mu, nu, count = adam_step(w, grad, state.mu, state.nu, state.count, lr)
    new_w = jnp.maximum(new_w, 1e-6)
    new_w = num_tasks * new_w / jnp.sum(new_w)
    new_state = GradNormState(new_w, initial, mu, nu, count)
    return weighted_sum(task_grads, w), new_state, w

  return Method(init, update, "gradient")


def imtl_weights(gram_matrix: jax.Array, rcond: float = 1e-5) -> jax.Array:
  """IMTL-G weights (Liu et al., 2021, Eq. 7) from the Gram matrix ``G_ij = <g_i, g_j>``.

  IMTL-G seeks ``g = Σ_t α_t g_t`` with ``Σ_t α_t = 1`` and equal projections ``<g, u_t>``
  onto all unit gradients ``u_t = g_t / ||g_t||``. The paper's closed form
  ``α_{2:T} = g_1 U^T (D U^T)^{-1}`` (``D``, ``U``: differences to task 1) solves that system;
  written on the Gram matrix it is ``G α = c n`` (``n_t = ||g_t||``), i.e. with the cosine
  matrix ``C = diag(1/n) G diag(1/n)`` and ``β = n ⊙ α``: ``C β = 1``, then ``α = (β / n) / Σ
  (β / n)``. ``C`` is solved by its pseudo-inverse (eigenvalues below ``rcond`` times the
  largest dropped), so identical gradients give equal weights ``1/T``; a zero gradient gets
  weight 0 (its direction is undefined); when nothing is left (all zero, or underflow) the
  weights are ``1/T``.
  """
  num_tasks = gram_matrix.shape[0]
  norms = safe_sqrt(jnp.diagonal(gram_matrix))
  valid = norms > 0
  inv_n = jnp.where(valid, 1.0 / jnp.where(valid, norms, 1.0), 0.0)
  cos = jnp.clip(gram_matrix * inv_n[:, None] * inv_n[None, :], -1.0, 1.0)
  cos = jnp.where(jnp.eye(num_tasks, dtype=bool), 1.0, cos)  # unit diagonal, zero rows too
  eigval, eigvec = jnp.linalg.eigh(cos)
  keep = eigval > rcond * jnp.max(eigval)
  inv_eig = jnp.where(keep, 1.0 / jnp.where(keep, eigval, 1.0), 0.0)
  beta = eigvec @ (inv_eig * (eigvec.T @ jnp.ones((num_tasks,), jnp.float32)))
  # Scale-free normalisation: α ∝ β / n = (β · n_max / n) / n_max.
  rel = jnp.where(valid, beta * jnp.max(norms) * inv_n, 0.0)
  total = jnp.sum(rel)
  uniform = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
  ok = (jnp.abs(total) > 1e-6) & jnp.all(jnp.isfinite(rel))
  return jnp.where(ok, rel / jnp.where(ok, total, 1.0), uniform)


def imtl() -> Method:
  """IMTL-G, impartial multi-task learning, gradient balance (Liu et al., 2021, Sec. 3.2).

  ``combined = Σ_t α_t g_t`` with :func:`imtl_weights` computed from the Gram matrix only;
  the weights sum to 1 and may be negative. (The loss-scale part, IMTL-L, is not included.)
  """
  init = stateless_init

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    return imtl_weights(g), state

  return gram_method(init, from_gram)


class DBMTLState(NamedTuple):
  """DB-MTL: the EMA of each task's log-loss gradient (task axis first) and the call count."""

  grad_ema: Any      # pytree like grads_like with a leading task axis, float32
  step: jax.Array    # int32


def db_mtl(beta: float = 0.9, beta_sigma: float = 0.0) -> Method:
  """Dual-balancing multi-task learning (Lin et al., 2023, Alg. 1).

  Loss scale balance: each task uses the gradient of ``log(L_t + 1e-8)``, i.e.
  ``ĝ_t = g_t / (L_t + 1e-8)``. Gradient magnitude balance: an EMA
  ``m_t ← β_k m_t + (1 - β_k) ĝ_t`` with ``β_k = beta / k^{beta_sigma}`` (``k`` = call number,
  ``m`` starts at 0), then every ``m_t`` is rescaled to the largest norm:
  ``combined = Σ_t (max_k ||m_k|| / (||m_t|| + 1e-8)) m_t``.

  Defaults ``beta=0.9``, ``beta_sigma=0`` (LibMTL's ``DB_beta``, ``DB_beta_sigma``). Needs
  ``grads_like`` at ``init``. With ``beta > 0`` the direction mixes past gradients and is not
  ``Σ w_t g_t`` of the current ones, so the returned weights are NaN; with ``beta == 0`` they
  are the exact ``max ||ĝ|| / (||ĝ_t|| (L_t + 1e-8))``.
  """
  def init(num_tasks, grads_like=None):
    ema = _per_task_zeros("db_mtl", "the per-task gradient EMA", num_tasks, grads_like)
    return DBMTLState(ema, jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses, key=None):
    del key
    num_tasks = num_tasks_of(task_grads)
    losses = jnp.asarray(losses, jnp.float32)
    step = state.step + 1
    b = beta / step.astype(jnp.float32) ** beta_sigma
    scale = 1.0 / (losses + 1e-8)

    def leaf_ema(m, g):
      g = g.astype(jnp.float32) * scale.reshape((num_tasks,) + (1,) * (g.ndim - 1))
      return g + b * (m - g)

    ema = jax.tree_util.tree_map(leaf_ema, state.grad_ema, task_grads)
    norms = safe_sqrt(_task_sq_norms(ema))
    alpha = jnp.max(norms) / (norms + 1e-8)
    combined = _cast_like(weighted_sum(ema, alpha), task_grads)
    if beta == 0:
      weights = alpha * scale
    else:
      weights = jnp.full((num_tasks,), jnp.nan, jnp.float32)
    return combined, DBMTLState(ema, step), weights

  return Method(init, update, "gradient")


class ExcessMTLState(NamedTuple):
  """ExcessMTL: per-task AdaGrad accumulators, the first call's excess risks, the weights."""

  grad_sq_sum: Any          # pytree like grads_like with a leading task axis, float32
  initial_excess: jax.Array  # (T,): the excess-risk estimates of the first call
  weights: jax.Array         # (T,): sums to T
  step: jax.Array            # int32


def excess_risks(task_grads, grad_sq_sum, eps: float = 1e-7) -> jax.Array:
  """``(T,)`` excess-risk estimates ``e_t = g_tᵀ diag(H_t)^{-1} g_t`` with the diagonal AdaGrad
  preconditioner ``H_t = sqrt(Σ_past g_t² + eps)`` (He et al., 2024; the official code
  drops the paper's ``½``, which cancels in the ratios used), leaf by leaf."""
  def leaf(g, h):
    g = g.reshape(g.shape[0], -1).astype(jnp.float32)
    h = h.reshape(h.shape[0], -1)
    return jnp.sum(g * g / jnp.sqrt(h + eps), axis=1)
  return sum(leaf(g, h) for g, h in zip(jax.tree_util.tree_leaves(task_grads),
                                        jax.tree_util.tree_leaves(grad_sq_sum), strict=True))


def excess_mtl(robust_step_size: float = 1e-2) -> Method:
  """ExcessMTL, robust multi-task learning with excess risks (He et al., 2024,
  Alg. 1; official code yifei-he/ExcessMTL, ``LibMTL/weighting/ExcessMTL.py``).

  Each call adds ``g_t²`` to the task's AdaGrad accumulator and estimates its excess risk
  :func:`excess_risks`. The first call records ``e_t(0)`` and keeps ``λ = 1``; later calls take
  one multiplicative-weights (exponentiated-gradient) step on the normalised excess risks,
  ``λ_t ← λ_t exp(η e_t / e_t(0))``, then ``λ ← T λ / Σ λ``, and ``combined = Σ_t λ_t g_t``
  with the new ``λ``. A task whose first excess risk is 0 (zero gradient) gets ``e_t/e_t(0) =
  0``. Default ``robust_step_size = 1e-2`` (``η``; the ``--robust_step_size`` default of the
  official ``config.py``). Needs ``grads_like`` at ``init``. The official code, on
  representation gradients, first sums them over the batch axis; here the given gradients are
  used as they are.
  """
  def init(num_tasks, grads_like=None):
    acc = _per_task_zeros("excess_mtl", "the per-task AdaGrad accumulators", num_tasks,
                          grads_like)
    return ExcessMTLState(acc, jnp.zeros((num_tasks,), jnp.float32),
                          jnp.ones((num_tasks,), jnp.float32), jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses, key=None):
    del losses, key
    num_tasks = num_tasks_of(task_grads)
    acc = jax.tree_util.tree_map(lambda h, g: h + jnp.square(g.astype(jnp.float32)),
                                 state.grad_sq_sum, task_grads)
    excess = excess_risks(task_grads, acc)
    first = state.step == 0
    initial = jnp.where(first, excess, state.initial_excess)
    ok = initial > 0
    ratio = jnp.where(ok, excess / jnp.where(ok, initial, 1.0), 0.0)
    # exp of the ratio: shift by its max (cancels in the normalisation) to avoid overflow.
    step = robust_step_size * ratio
    stepped = state.weights * jnp.exp(step - jnp.max(step))
    stepped = num_tasks * stepped / jnp.sum(stepped)
    weights = jnp.where(first, state.weights, stepped)
    combined = _cast_like(weighted_sum(task_grads, weights), task_grads)
    return combined, ExcessMTLState(acc, initial, weights, state.step + 1), weights

  return Method(init, update, "gradient")

METHODS = {"gradnorm": gradnorm, "imtl": imtl, "db_mtl": db_mtl, "excess_mtl": excess_mtl}
