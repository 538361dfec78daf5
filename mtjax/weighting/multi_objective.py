"""Multi-objective gradient aggregation: MGDA, CAGrad, Nash-MTL, UPGrad, DualProj, FairGrad,
SDMGrad, MoDo.

Every method here depends on the task gradients only through their ``(T, T)`` Gram matrix
(:func:`~mtjax.weighting.base.gram`) and returns ``combined = Σ_t w_t g_t``
(:func:`~mtjax.weighting.base.weighted_sum`) with the effective weights ``w``; the small
optimisation problems run a fixed number of float32 iterations on device
(:mod:`mtjax.weighting.solvers`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtjax.weighting import solvers
from mtjax.weighting.base import (
  GRAM_TINY,
  EmptyState,
  Method,
  gram_method,
  safe_div,
  safe_sqrt,
  stateless_init,
)

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def mgda(normalization: str = "none", num_iters: int = 100) -> Method:
  """MGDA (Sener & Koltun, 2018): the min-norm point of the convex hull of the task gradients.

  ``w = argmin_{w ∈ Δ} |Σ_t w_t ĝ_t|²`` (Eq. 3, solved by :func:`solvers.min_norm_weights`) with
  ``ĝ_t = g_t / n_t`` normalised as in the reference code ``MultiObjectiveOptimization``
  (``gradient_normalizers``): ``"none"`` (n = 1), ``"l2"`` (n = |g_t|), ``"loss"`` (n = L_t),
  ``"loss+"`` (n = L_t |g_t|). Default ``"none"``, as LibMTL's ``mgda_gn`` and Nash-MTL's MGDA.
  As in the reference training script the simplex weights multiply the *unnormalised* gradients:
  ``combined = Σ_t w_t g_t``, ``Σ_t w_t = 1`` (LibMTL instead combines the normalised ``ĝ_t``;
  Nash-MTL's copy multiplies ``w`` by ``T``). Applied to whatever gradients it is given, so on
  representation-level gradients this is MGDA-UB. A task whose normaliser is 0 gets a zero row.
  """
  if normalization not in MGDA_NORMALIZATIONS:
    raise ValueError(f"mgda: normalization={normalization!r}; allowed: {MGDA_NORMALIZATIONS}")

  def from_gram(g, state, *, losses, key=None):
    del key
    losses = jnp.asarray(losses, jnp.float32)
    norms = safe_sqrt(jnp.diag(g))
    n = {"none": jnp.ones_like(losses), "l2": norms, "loss": losses,
         "loss+": losses * norms}[normalization]
    inv = safe_div(1.0, n)
    weights = solvers.min_norm_weights(g * inv[:, None] * inv[None, :], num_iters)
    return weights, state

  return gram_method(stateless_init, from_gram)


def cagrad_weights(g: jax.Array, c: float, num_iters: int = 20,
                   inner_iters: int = 20) -> jax.Array:
  """CAGrad's dual weights (Liu et al., 2021, Eq. 7 / Alg. 1 of the official code):
  ``w* = argmin_{w ∈ Δ} g_wᵀ g_0 + c |g_0| |g_w|`` with ``g_w = Σ w_t g_t``, ``g_0`` the mean.

  Written as ``min_{w ∈ Δ, s > 0} g_wᵀ g_0 + (c |g_0| / 2)(|g_w|² / s + s)`` (jointly convex) and
  solved by ``num_iters`` exact alternating steps: ``s = |g_w|``, then a simplex QP in ``w``
  (:func:`solvers.simplex_qp`, warm-started). ``g`` is scaled first (the minimiser does not
  depend on the scale).
  """
  g = solvers.symmetrize(g)
  t = g.shape[0]
  g = g * safe_div(float(t), jnp.trace(g))
  u = jnp.full((t,), 1.0 / t, jnp.float32)
  lin = g @ u
  cn = c * safe_sqrt(u @ lin)

  def objective(w):
    return w @ lin + cn * safe_sqrt(w @ g @ w)

  def body(_, w):
    s = jnp.maximum(safe_sqrt(w @ g @ w), 1e-6)
    w_new = solvers.simplex_qp((cn / s) * g, lin, inner_iters, w0=w)
    return jnp.where(objective(w_new) <= objective(w), w_new, w)

  return jax.lax.fori_loop(0, num_iters, body, u)


def cagrad(c: float = 0.4, rescale: int = 1, num_iters: int = 20,
           norm_eps: float = 1e-3) -> Method:
  """CAGrad (Liu et al., 2021): ``d = g_0 + (c |g_0| / |g_w|) g_w`` with the dual weights of
  :func:`cagrad_weights`, so that ``|d - g_0| <= c |g_0|`` and ``min_t <g_t, d>`` is maximised
  over that ball. ``rescale`` divides ``d`` by 1 (0), ``1 + c²`` (1) or ``1 + c`` (2).

  Defaults ``c = 0.4`` (NYUv2 ``run.sh`` of the official code Cranial-XIX/CAGrad; its function
  default is 0.5, LibMTL's ``calpha`` 0.5) and ``rescale = 1``. Convention: ``g_0`` is the *mean*
  gradient (LibMTL; with ``c = 0`` the result is exactly the mean); the official code multiplies
  ``d`` by ``T`` "to match the sum loss". The official code adds 1e-8 inside the square roots and
  solves the dual with SLSQP; this solves it on device (scale-free, no additive epsilons).

  At a Pareto-stationary point (0 in the convex hull of the gradients) the dual solution can
  have ``g_w = 0``, where ``g_w / |g_w|`` has no direction: as torchjd's ``CAGradWeighting``,
  when ``|g_w| < norm_eps |J|_F`` (``|J|_F² = tr G``) and ``c > 0`` the weights are 0 (no move).
  ``norm_eps = 1e-3``, not torchjd's 1e-4: ``|g_w|² = wᵀ G w`` from a float32 Gram matrix
  carries a rounding error of about ``1e-7 tr G``, so ``|g_w|`` below ``≈ 3e-4 |J|_F`` cannot be
  told from 0. For ``c >= 1`` that is exactly the stationary case:
  ``g_wᵀ g_0 + c |g_0| |g_w| >= 0`` with equality only at ``g_w = 0``.
  """
  if rescale not in (0, 1, 2):
    raise ValueError(f"cagrad: rescale={rescale!r}; allowed: 0, 1, 2")
  if not c >= 0:
    raise ValueError(f"cagrad: c={c!r}; expected a number >= 0 (the radius of the ball around "
                     "the mean gradient, relative to its norm)")
  if not norm_eps >= 0:
    raise ValueError(f"cagrad: norm_eps={norm_eps!r}; expected a number >= 0")

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    t = g.shape[0]
    u = jnp.full((t,), 1.0 / t, jnp.float32)
    w = cagrad_weights(g, c, num_iters)
    g0_norm = safe_sqrt(u @ g @ u)
    gw_norm = safe_sqrt(w @ g @ w)
    lam = c * safe_div(g0_norm, gw_norm)
    weights = u + lam * w
    weights = weights / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    stationary = (c > 0) & (gw_norm < norm_eps * safe_sqrt(jnp.trace(g)))
    return jnp.where(stationary, 0.0, weights), state

  return gram_method(stateless_init, from_gram)


class NashMTLState(NamedTuple):
  """Nash-MTL's last bargaining solution ``alpha`` (warm start and reuse) and step counter."""
  alpha: jax.Array
  step: jax.Array


def nash_alpha(g: jax.Array, alpha0: jax.Array, num_iters: int = 20,
               ridge: float = 1e-6) -> jax.Array:
  """The Nash bargaining solution of Navon et al. (2022), Eq. 4: ``α ⊙ (G α) = 1``, ``α > 0``,
  for ``G`` scaled to unit Frobenius norm (as the official code) plus ``ridge · I``.

  ``α`` is the minimiser of the self-concordant ``φ(α) = ½ αᵀ G α - Σ_t log α_t`` (its gradient
  is ``G α - 1/α``); ``num_iters`` damped Newton steps ``α ← α - Δ / (1 + λ)`` (Nesterov 2004,
  §4.1.5; λ the Newton decrement) from ``alpha0`` stay positive and converge globally. The
  ridge makes ``φ`` bounded below when a gradient is zero or the gradients are dependent (then
  the zero task gets ``α ≈ ridge^-1/2``, times zero gradient).
  """
  g = solvers.symmetrize(g)
  t = g.shape[0]
  g = g * safe_div(1.0, jnp.sqrt(jnp.sum(g * g))) + ridge * jnp.eye(t)
  alpha0 = jnp.where(jnp.isfinite(alpha0) & (alpha0 > 0), alpha0, 1.0)

  def body(_, a):
    grad = g @ a - 1.0 / a
    hess = g + jnp.diag(1.0 / (a * a))
    delta = jnp.linalg.solve(hess, grad)
    lam = safe_sqrt(grad @ delta)
    a_new = a - delta / (1.0 + lam)
    ok = jnp.all(jnp.isfinite(a_new) & (a_new > 0))
    return jnp.where(ok, a_new, a)

  return jax.lax.fori_loop(0, num_iters, body, alpha0.astype(jnp.float32))


def nash_mtl(max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20,
             ridge: float = 1e-6) -> Method:
  """Nash-MTL (Navon et al., 2022): ``combined = Σ_t α_t g_t`` with ``α ⊙ (G α) = 1``.

  Defaults from the official code AvivNavon/nash-mtl (``max_norm = 1.0``,
  ``update_weights_every = 1``, ``optim_niter = 20``). ``α`` solves Eq. 4 on the raw Gram
  matrix, as the official code (its CCP sequence with cvxpy takes ``Ĝ = G / |G|_F`` and the
  constraints ``α_t |G|_F (Ĝ α)_t >= 1``), so ``|Σ α_t g_t|² = T``; here
  ``optim_niter`` damped Newton steps on device (:func:`nash_alpha`) find ``β`` for
  ``G / |G|_F`` and ``α = β / |G|_F^{1/2}`` (``β`` when ``G`` is 0), warm-started from the last
  ``α`` as the official code (its direction, scaled to the minimum of ``φ`` along it).
  ``max_norm > 0`` clips ``|Σ α_t g_t|`` to ``max_norm`` as the official ``clip_grad_norm_`` on
  the shared parameters (folded into the returned weights; with the exact ``α`` and ``T >= 2``,
  ``|Σ α_t g_t| = sqrt(T) > 1`` is always clipped at the default ``max_norm = 1``). Between
  updates (``update_weights_every > 1``) the last ``α`` is reused. ``ridge``: see
  :func:`nash_alpha`.
  """
  if update_weights_every < 1:
    raise ValueError(f"nash_mtl: update_weights_every={update_weights_every!r} must be >= 1")

  def init(num_tasks, grads_like=None):
    del grads_like
    return NashMTLState(alpha=jnp.ones((num_tasks,), jnp.float32),
                        step=jnp.zeros((), jnp.int32))

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    g = solvers.symmetrize(g)
    root = jnp.sqrt(jnp.sqrt(jnp.sum(g * g)))  # |G|_F^{1/2}: α for G is β for G / |G|_F, / root
    root = jnp.where(root > 0, root, 1.0)
    # Warm start: the last α's direction, scaled to the minimum of φ along it (c² = T / bᵀĜb).
    b = state.alpha
    quad = b @ (g / (root * root) + ridge * jnp.eye(g.shape[0])) @ b
    b = b * jnp.where(quad > 0, jnp.sqrt(g.shape[0] / jnp.where(quad > 0, quad, 1.0)), 1.0)
    fresh = nash_alpha(g, b, optim_niter, ridge) / root
    alpha = jnp.where(state.step % update_weights_every == 0, fresh, state.alpha)
    weights = alpha
    if max_norm > 0:
      norm = safe_sqrt(alpha @ solvers.symmetrize(g) @ alpha)
      weights = alpha * jnp.where(norm > max_norm, safe_div(max_norm, norm), 1.0)
    return weights, NashMTLState(alpha, state.step + 1)

  return gram_method(init, from_gram)


def _dual_cone_gram(g, norm_eps, reg_eps):
  """torchjd's ``regularize(normalize(G, norm_eps), reg_eps)``: ``G / tr(G)`` (0 when
  ``tr(G) < norm_eps``) plus ``reg_eps · I``."""
  g = solvers.symmetrize(g)
  tr = jnp.trace(g)
  g = jnp.where(tr >= norm_eps, g * safe_div(1.0, tr), 0.0)
  return g + reg_eps * jnp.eye(g.shape[0])


def project_weights(u: jax.Array, q: jax.Array, num_iters: int = 100) -> jax.Array:
  """Weights ``w`` of the projection of ``Jᵀ u`` onto the dual cone ``{x : J x >= 0}``:
  ``w = argmin_{v >= u} vᵀ q v`` with ``q = J Jᵀ`` (Quinton & Rey 2024, Prop. 1), by
  :func:`solvers.box_qp`. ``u`` may carry leading batch axes."""
  solve = lambda v: solvers.box_qp(q, jnp.zeros_like(v), v, num_iters)
  for _ in range(u.ndim - 1):
    solve = jax.vmap(solve)
  return solve(u)


def _pref(pref_vector, t):
  if pref_vector is None:
    return jnp.full((t,), 1.0 / t, jnp.float32)
  pref = jnp.asarray(pref_vector, jnp.float32)
  if pref.shape != (t,):
    raise ValueError(f"pref_vector has shape {pref.shape}, expected ({t},) (one per task)")
  return pref


def _check_pref(name, pref_vector):
  def init(num_tasks, grads_like=None):
    del grads_like
    if pref_vector is not None and len(pref_vector) != num_tasks:
      raise ValueError(f"{name}: 'pref_vector' has {len(pref_vector)} entries, expected one per "
                       f"task ({num_tasks})")
    return EmptyState()
  return init


def upgrad(pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
           num_iters: int = 100) -> Method:
  """UPGrad (Quinton & Rey, 2024, Eq. 5): ``Σ_i π_J(u_i g_i)``, each (preference-weighted) task
  gradient projected onto the dual cone of all of them, via Prop. 1:
  ``w = Σ_i argmin_{v >= u_i e_i} vᵀ G v`` and ``combined = Σ_t w_t g_t``.

  Defaults as torchjd's ``UPGrad``: ``pref_vector=None`` (uniform ``1/T``), ``norm_eps=1e-4``
  (``G`` is divided by its trace, or zeroed when the trace is below ``norm_eps`` — an absolute
  threshold), ``reg_eps=1e-4`` (ridge on the normalised ``G``). torchjd calls quadprog;
  this runs :func:`solvers.box_qp` for ``num_iters`` steps plus an exact active-set polish.
  """
  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    q = _dual_cone_gram(g, norm_eps, reg_eps)
    weights = jnp.sum(project_weights(jnp.diag(_pref(pref_vector, g.shape[0])), q, num_iters),
                      axis=0)
    return weights, state

  return gram_method(_check_pref("upgrad", pref_vector), from_gram)


def dualproj(pref_vector=None, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
             num_iters: int = 100) -> Method:
  """DualProj (Quinton & Rey, 2024; Lopez-Paz & Ranzato 2017, Eq. 11): the (preference-weighted)
  mean gradient projected onto the dual cone of the task gradients,
  ``w = argmin_{v >= u} vᵀ G v``, ``combined = Σ_t w_t g_t``. Defaults and solver as
  :func:`upgrad` (torchjd's ``DualProj``)."""
  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    q = _dual_cone_gram(g, norm_eps, reg_eps)
    weights = project_weights(_pref(pref_vector, g.shape[0]), q, num_iters)
    return weights, state

  return gram_method(_check_pref("dualproj", pref_vector), from_gram)


def _clip_weights(weights, g, max_norm):
  """Folds ``clip_grad_norm_(·, max_norm)`` of ``Σ_t w_t g_t`` into ``w`` (no-op if
  ``max_norm <= 0``)."""
  if max_norm <= 0:
    return weights
  norm = safe_sqrt(weights @ solvers.symmetrize(g) @ weights)
  return weights * jnp.where(norm > max_norm, safe_div(max_norm, norm), 1.0)


def fairgrad_weights(g: jax.Array, alpha: float, num_iters: int = 30,
                     ridge: float = 1e-6) -> jax.Array:
  """FairGrad's weights (Ban & Ji, 2024): the ``w > 0`` with ``G w = w^{-1/α}``, the optimality
  condition of its α-fair problem.

  The official code (OptMN-Lab/fairgrad, ``FairGrad.fairgrad``) solves this on the raw Gram
  matrix with scipy's ``least_squares`` from ``1/T``. Here: ``Ĝ = G / s + ridge · I`` with
  ``s = tr(G) / T``; ``num_iters`` Newton steps on ``F(v) = Ĝ e^v - e^{-v/α}`` in ``v = log w``
  (so ``w`` stays positive), each with a fixed grid line search (step ``2^-k``, ``k < 10``,
  the largest that decreases ``|F|²``; ``F`` is the gradient of the strictly convex
  ``½ wᵀĜw - Σ_t u_α(w_t)``, its Jacobian ``(Ĝ + diag(w^{-1/α-1}) / α) diag(w)`` is
  nonsingular, so the Newton direction always descends ``|F|²``); then ``w = ŵ s^{-α/(α+1)}``,
  the exact rescaling to the raw ``G``. The ridge bounds the weight of a zero gradient (then
  ``ŵ = ridge^{-α/(α+1)}``, times a zero gradient). Accuracy (``tests/weighting/test_fairgrad.py``):
  ``w`` agrees with a float64 Newton solution of the same ridged system to a relative ``1e-5``
  on random problems with ``T <= 10``, ``α ∈ [0.5, 10]``. Entries of ``ŵ`` whose exact value is
  below ``e^-80`` (large ``α`` with strongly conflicting gradients) stop at ``e^-80``.
  """
  g = solvers.symmetrize(g)
  t = g.shape[0]
  s = jnp.trace(g) / t
  gn = g * safe_div(1.0, s) + ridge * jnp.eye(t)
  inv_alpha = 1.0 / alpha

  def residual(v):
    return gn @ jnp.exp(v) - jnp.exp(jnp.clip(-v * inv_alpha, -80.0, 80.0))

  steps = 0.5 ** jnp.arange(10, dtype=jnp.float32)

  def body(_, v):
    w = jnp.exp(v)
    f = residual(v)
    jac = gn * w[None, :] + jnp.diag(inv_alpha * jnp.exp(jnp.clip(-v * inv_alpha, -80.0, 80.0)))
    delta = jnp.linalg.solve(jac, f)
    cands = jnp.clip(v[None, :] - steps[:, None] * delta[None, :], -80.0, 80.0)
    merit = jnp.sum(jax.vmap(residual)(cands) ** 2, axis=1)
    m0 = jnp.sum(f * f)
    ok = jnp.isfinite(merit) & (merit <= (1.0 - 1e-4 * steps) * m0)
    best = jnp.argmax(ok)
    return jnp.where(jnp.any(ok), cands[best], v)

  v = jax.lax.fori_loop(0, num_iters, body, jnp.zeros((t,), jnp.float32))
  scale = jnp.where(s > GRAM_TINY, jnp.abs(s) ** (-alpha / (alpha + 1.0)), 1.0)
  return jnp.exp(v) * scale


def fairgrad(alpha: float = 2.0, max_norm: float = 1.0, num_iters: int = 30,
             ridge: float = 1e-6) -> Method:
  """FairGrad (Ban & Ji, 2024): ``combined = Σ_t w_t g_t`` with ``G w = w^{-1/α}``, the
  update that maximises the α-fair utility ``Σ_t <g_t, d>^{1-α} / (1-α)`` of the tasks'
  progress ``<g_t, d>`` subject to ``|d| <= 1`` (up to scale). ``α = 1`` is proportional
  fairness (Nash-MTL's ``w ⊙ G w = 1``); ``α → ∞`` is max-min fairness (equal ``<g_t, d>``).

  Defaults: ``alpha = 2.0`` (every ``run.sh`` of the official code OptMN-Lab/fairgrad — NYUv2,
  Cityscapes, CelebA, QM9; its trainer flag defaults to 1.0), ``max_norm = 1.0`` (the official
  ``WeightMethod`` clips the shared gradient with ``clip_grad_norm_(·, 1.0)``; folded into the
  returned weights, 0 disables it). The system is solved on device by :func:`fairgrad_weights`
  (``num_iters`` Newton steps, ``ridge``) instead of scipy's ``least_squares``.
  """
  if alpha <= 0:
    raise ValueError(f"fairgrad: alpha={alpha!r} must be > 0")

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    return _clip_weights(fairgrad_weights(g, alpha, num_iters, ridge), g, max_norm), state

  return gram_method(stateless_init, from_gram)


def sdmgrad_weights(g: jax.Array, lamda: float, num_iters: int = 100) -> jax.Array:
  """SDMGrad's simplex weights (Xiao et al., 2023, the dual of the problem in :func:`sdmgrad`):
  ``w* = argmin_{w ∈ Δ} ½ |g_w + λ g_0|²`` with ``g_w = Σ_t w_t g_t`` and ``g_0`` the mean, i.e.
  ``½ wᵀ G w + λ wᵀ G u`` (``u = 1/T``), by :func:`solvers.simplex_qp` on ``G / (tr(G) / T)``
  (the minimiser does not depend on the scale)."""
  g = solvers.symmetrize(g)
  t = g.shape[0]
  g = g * safe_div(float(t), jnp.trace(g))
  u = jnp.full((t,), 1.0 / t, jnp.float32)
  return solvers.simplex_qp(g, lamda * (g @ u), num_iters)


def sdmgrad(lamda: float = 0.3, max_norm: float = 1.0, num_iters: int = 100) -> Method:
  """SDMGrad (Xiao et al., 2023): ``d = (g_w + λ g_0) / (1 + λ)`` with the weights of
  :func:`sdmgrad_weights`. It solves the direction-oriented problem
  ``max_d min_{w ∈ Δ} <g_w, d> - ½|d|² - (λ/2)|d - g_0|²`` (the paper's penalised
  direction-oriented problem), whose solution stays in a neighbourhood of the mean:
  ``|d - g_0| = |g_w - g_0| / (1 + λ)``; ``λ = 0`` is MGDA's min-norm
  direction, ``λ → ∞`` the mean gradient.

  Defaults: ``lamda = 0.3`` (``run.sh`` of the official code OptMN-Lab/sdmgrad for NYUv2 and
  Cityscapes, and LibMTL's ``SDMGrad_lamda``), ``max_norm = 1.0`` (the official ``WeightMethod``'s
  ``clip_grad_norm_``; folded into the weights, 0 disables it). Differences from the official
  code: it takes ``niter = 20`` projected heavy-ball steps (lr 10, momentum 0.5) on the same
  subproblem per call, warm-started from the previous call's ``w``, on the Gram matrix divided
  by ``mean_t sqrt(G_tt + 1e-4)²``; here the subproblem is solved to the accuracy of
  :func:`solvers.simplex_qp` (``num_iters`` accelerated steps + exact polish) at every call, so
  no state is kept. The paper's three independent mini-batches (``ζ, ξ, ξ'``) are one batch here,
  as in effect in the official code (its three gradient buffers are one tensor).
  """
  if lamda < 0:
    raise ValueError(f"sdmgrad: lamda={lamda!r} must be >= 0")

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    t = g.shape[0]
    w = sdmgrad_weights(g, lamda, num_iters)
    weights = (w + lamda / t) / (1.0 + lamda)
    return _clip_weights(weights, g, max_norm), state

  return gram_method(stateless_init, from_gram)


class ModoState(NamedTuple):
  weights: jnp.ndarray  # λ on the simplex


def modo_lambda_step(cross_gram: jax.Array, lam: jax.Array, gamma: float,
                     rho: float) -> jax.Array:
  """MoDo's λ update (Chen et al., 2023; LibMTL's ``MoDo.backward``):
  ``λ ← Π_Δ(λ − γ (∇F(x; z₁)ᵀ ∇F(x; z₂) λ + ρ λ))``, with ``cross_gram[i, j] = <g_i(z₁),
  g_j(z₂)>`` the ``(T, T)`` products of two independent samples' task gradients (one sample:
  the Gram matrix) and ``Π_Δ`` the Euclidean projection onto the simplex."""
  cross_gram = jnp.asarray(cross_gram, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  return solvers.project_simplex(lam - gamma * (cross_gram @ lam + rho * lam))


def modo(gamma: float = 1e-3, rho: float = 0.1, double_sampling: bool = True) -> Method:
  """MoDo, multi-objective gradient with double sampling (Chen et al., NeurIPS 2023,
  "Three-way trade-off in multi-objective learning", Algorithm 1): one projected
  stochastic-gradient step on MGDA's regularised min-norm problem
  ``min_{λ ∈ Δ} ½|Σ_t λ_t g_t|² + (ρ/2)|λ|²`` per train step (:func:`modo_lambda_step`), then the
  model moves along ``d = Σ_t λ_t g_t`` with the *new* λ. λ starts uniform (``1/T``) and stays
  on the simplex, so ``d`` has the scale of the mean gradient. Repeated on fixed gradients with
  ``0 < γ <= 2 / (λ_max(G) + ρ)`` the λ iteration (projected gradient descent on a convex
  quadratic) converges to the minimiser of the regularised problem, which for ``ρ = 0`` is
  MGDA's min-norm weights (Sener & Koltun, 2018); with ``γ = 0`` it is the mean gradient
  (``λ = 1/T``) forever.

  ``double_sampling=True`` (default; the paper's method): in the train step the λ step uses the
  cross products ``∇F(z₁)ᵀ ∇F(z₂)`` of two independent samples, the two halves of the batch
  (even and odd examples, see :func:`mtjax.train.step.cross_gram`): an unbiased estimate of
  ``∇Fᵀ ∇F``, where one sample's Gram matrix is biased by the gradient noise. The model then
  moves along ``Σ_t λ_t g_t`` of the whole batch, i.e. of ``∇F(z₁) + ∇F(z₂)`` up to a factor 2, as
  the authors' code does (heshandevaka/Trade-Off-MOL, ``LibMTL/weighting/MoDo.py``: two samples,
  the model moved along the sum of both samples' ``Σ_t λ_t g_t``). LibMTL's ``MoDo`` draws a
  third batch for the model update instead; the whole batch here needs no third forward pass.
  The per-device batch must then be even. ``double_sampling=False``: the single-sample variant,
  whose λ step uses the batch's Gram matrix ``G``. Called directly, ``update`` is the
  single-sample rule on the gradients it is given; a caller with two samples' gradients can call
  :func:`modo_lambda_step` with their cross products.

  Defaults ``gamma = 1e-3``, ``rho = 0.1``: LibMTL's ``MoDo_gamma``/``MoDo_rho``
  (``LibMTL/config.py``; the method is ``LibMTL/weighting/MoDo.py``); the authors' own
  repository has ``gamma_modo = 0.1``, ``rho_modo = 0.0`` in its argument parser.
  """
  if gamma < 0 or rho < 0:
    raise ValueError(f"modo: gamma={gamma!r} and rho={rho!r} must be >= 0")

  def init(num_tasks, grads_like=None):
    del grads_like
    return ModoState(jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32))

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    weights = modo_lambda_step(g, state.weights, gamma, rho)
    return weights, ModoState(weights)

  return gram_method(init, from_gram)._replace(double_sampling=bool(double_sampling))


METHODS = {
    "mgda": mgda,
    "cagrad": cagrad,
    "nash_mtl": nash_mtl,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "fairgrad": fairgrad,
    "sdmgrad": sdmgrad,
    "modo": modo,
}
