"""Gradient surgery: methods that edit the task gradients before (or instead of) summing them.

PCGrad, GradVac, Aligned-MTL and ConFIG only need the ``(T, T)`` Gram matrix: every edited
gradient they form is a linear combination of the original gradients, so they compute the
coefficients of those combinations from the Gram matrix and finish with one ``weighted_sum``.
GradDrop is element-wise (leaf by leaf). MoCo keeps a per-task gradient estimate in its state.

The Gram-only methods are invariant to a global rescaling of the gradients, so they work on
the Gram matrix divided by its largest diagonal entry (no overflow/underflow in the small
solvers). Gradients so small that their Gram matrix underflows in float32 (norms below about
1e-19) look like zero gradients to them: they then return the plain sum (weights 1), never NaN.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtjax.weighting.base import (
  Method,
  gram,
  gram_method,
  num_tasks_of,
  safe_div,
  safe_sqrt,
  stateless_init,
  weighted_sum,
)

_HIGHEST = jax.lax.Precision.HIGHEST
_EPS32 = float(jnp.finfo(jnp.float32).eps)


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _scaled(g: jax.Array) -> jax.Array:
  """The Gram matrix ``g`` divided by its largest diagonal entry (all zeros stay zeros)."""
  return safe_div(g, jnp.max(jnp.diag(g)))


def _sum_if_zero(g, weights):
  """Weights 1 (the plain sum) when every gradient is zero (or underflows in the Gram matrix)."""
  return jnp.where(jnp.max(jnp.diag(g)) > 0, weights, jnp.ones_like(weights))


def _require_key(name, key):
  if key is None:
    raise ValueError(f"{name}: update needs a PRNG `key` (it draws a random task order or mask)")


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """``(T, T)`` int array; row ``i`` is a uniformly random order of the tasks for task ``i``.

  PCGrad and GradVac visit the other tasks ``j != i`` in this order (``j == i`` is skipped).
  """
  return jnp.argsort(jax.random.uniform(key, (num_tasks, num_tasks)), axis=1)


# ---------------------------------------------------------------------------------------------
# PCGrad


def pcgrad_coefficients(g: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad's projected gradients as coefficients on the original ones (Yu et al., 2020, Alg. 1).

  For each task ``i`` and each other task ``j`` in ``orders[i]``: if ``<g_i', g_j> < 0`` then
  ``g_i' <- g_i' - <g_i', g_j> / |g_j|^2 g_j`` (``g_i'`` the already projected gradient, ``g_j``
  the original one). Returns ``C`` with ``g_i' = Σ_k C[i, k] g_k``; ``g`` is the Gram matrix.
  The rows are independent, so all tasks are projected at once, one position of the order at a
  time (a fixed-length loop of ``T`` steps).
  """
  num_tasks = g.shape[0]
  rows = jnp.arange(num_tasks)
  sq_norms = jnp.diag(g)

  def body(p, c):
    j = orders[:, p]
    dot = jnp.sum(c * g[:, j].T, axis=1)  # <g_i', g_j> = Σ_k C[i, k] G[k, j]
    conflict = (j != rows) & (dot < 0) & (sq_norms[j] > 0)
    coef = jnp.where(conflict, -safe_div(dot, sq_norms[j]), 0.0)
    return c.at[rows, j].add(coef)

  return jax.lax.fori_loop(0, num_tasks, body, jnp.eye(num_tasks, dtype=g.dtype))


def pcgrad() -> Method:
  """PCGrad, projecting conflicting gradients (Yu et al., 2020, "Gradient Surgery", Alg. 1).

  Each task gradient is projected onto the normal plane of every other task gradient it
  conflicts with (negative inner product), in a random order drawn from ``key``; the projected
  gradients are then summed (``Σ_i g_i'``, as in the paper and LibMTL's ``PCGrad.py``; LibMTL also
  visits ``j == i``, which the paper and this implementation skip). ``weights`` are the per-task
  totals of the projection coefficients, so ``combined == Σ_t weights_t g_t``.
  """
  init = stateless_init

  def from_gram(g, state, *, losses=None, key=None):
    del losses
    _require_key("pcgrad", key)
    c = pcgrad_coefficients(_scaled(g), task_orders(key, g.shape[0]))
    return jnp.sum(c, axis=0), state

  return gram_method(init, from_gram)


# ---------------------------------------------------------------------------------------------
# GradVac


class GradVacState(NamedTuple):
  """``targets[i, j]``: the EMA target ``φ̂_ij`` of the cosine similarity of ``g_i'`` and ``g_j``."""

  targets: jax.Array


def gradvac_coefficients(g, targets, orders, beta, ema_on_adjust_only=False):
  """GradVac's edited gradients as coefficients on the originals (Wang et al., 2021, Alg. 1).

  For each task ``i`` and each other ``j`` in ``orders[i]``: ``φ = cos(g_i', g_j)``; when
  ``φ < φ̂_ij``, ``g_i' <- g_i' + w g_j`` with the paper's closed form
  ``w = |g_i'| (φ̂ sqrt(1-φ²) - φ sqrt(1-φ̂²)) / (|g_j| sqrt(1-φ̂²))``, which makes
  ``cos(g_i', g_j) = φ̂`` exactly; then ``φ̂_ij <- (1-β) φ̂_ij + β φ`` (only when ``g_i'`` was
  adjusted if ``ema_on_adjust_only``, as LibMTL 1.1.5's ``GradVac.py`` does). Returns
  ``(C, targets)`` with ``g_i' = Σ_k C[i, k] g_k``; ``g`` is the Gram matrix.
  """
  num_tasks = g.shape[0]
  rows = jnp.arange(num_tasks)
  norms = safe_sqrt(jnp.diag(g))

  def body(p, carry):
    c, phi_hat_all = carry
    j = orders[:, p]
    valid = j != rows
    dot = jnp.sum(c * g[:, j].T, axis=1)
    norm_i = safe_sqrt(jnp.sum(_mm(c, g) * c, axis=1))
    norm_j = norms[j]
    phi = jnp.clip(safe_div(dot, norm_i * norm_j), -1.0, 1.0)
    phi_hat = phi_hat_all[rows, j]
    adjust = valid & (phi < phi_hat)
    root_hat = safe_sqrt(1.0 - phi_hat**2)
    w = safe_div(norm_i * (phi_hat * safe_sqrt(1.0 - phi**2) - phi * root_hat), norm_j * root_hat)
    c = c.at[rows, j].add(jnp.where(adjust, w, 0.0))
    move = (valid & adjust) if ema_on_adjust_only else valid
    phi_hat = jnp.where(move, (1.0 - beta) * phi_hat + beta * phi, phi_hat)
    return c, phi_hat_all.at[rows, j].set(phi_hat)

  init = (jnp.eye(num_tasks, dtype=g.dtype), jnp.asarray(targets, jnp.float32))
  return jax.lax.fori_loop(0, num_tasks, body, init)


def gradvac(beta: float = 0.5, ema_on_adjust_only: bool = False) -> Method:
  """Gradient Vaccine (Wang et al., 2021, Alg. 1), whole-model variant.

  Like PCGrad, but instead of stopping at orthogonality it raises ``cos(g_i', g_j)`` to an EMA
  target ``φ̂_ij`` of the observed similarities (state, initialised at 0, so the first step is
  exactly PCGrad). The rule is applied to the whole pytree at once (LibMTL's ``group_type=0``,
  "whole_model"; its per-layer variants are not implemented). ``beta=0.5`` is LibMTL's default.
  The paper and LibMTL's current ``GradVac.py`` move the EMA at every step; LibMTL 1.1.5 (and
  SamsungLabs/MTL) only when the gradient was adjusted, which keeps the targets at or below 0 —
  set ``ema_on_adjust_only=True`` for that.
  ``weights`` are the per-task totals of the coefficients (``combined == Σ_t weights_t g_t``).
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gradvac: 'beta' must lie in [0, 1], got {beta}")

  def init(num_tasks, grads_like=None):
    del grads_like
    return GradVacState(targets=jnp.zeros((num_tasks, num_tasks), jnp.float32))

  def from_gram(g, state, *, losses=None, key=None):
    del losses
    _require_key("gradvac", key)
    c, targets = gradvac_coefficients(_scaled(g), state.targets, task_orders(key, g.shape[0]),
                                      beta, ema_on_adjust_only)
    return jnp.sum(c, axis=0), GradVacState(targets)

  return gram_method(init, from_gram)


# ---------------------------------------------------------------------------------------------
# GradDrop


def graddrop(leak: float = 0.0) -> Method:
  """Gradient Sign Dropout (Chen et al., 2020, "Just Pick a Sign").

  Per element: purity ``P = ½ (1 + Σ_t g_t / Σ_t |g_t|)``; with ``U ~ Uniform(0, 1)`` drawn from
  ``key``, keep the positive contributions where ``U < P`` and the negative ones where
  ``U > P``; ``combined = Σ_t g_t (leak + (1 - leak) M_t)``. ``leak=0.0`` as LibMTL.
  The paper (and LibMTL) apply it to the gradients of a shared representation, folding the
  batch axis in with the sign of the activations; here it acts element-wise on whatever
  ``task_grads`` holds (parameter or representation gradients, no batch folding). One uniform
  vector is drawn for all elements and sliced leaf by leaf, so a pytree gives the same result as
  its flattened ``(T, D)`` matrix. No task weights exist: ``weights`` is NaN. ``leak`` is one
  number or one per task (the paper's ``l_i``; torchjd's ``GradDrop(leak=...)``), each in
  ``[0, 1]``; a sequence of the wrong length is refused by ``init``.
  """
  leaks = np.atleast_1d(np.asarray(leak, np.float64))
  if leaks.ndim != 1 or leaks.size == 0 or not np.all((leaks >= 0.0) & (leaks <= 1.0)):
    raise ValueError(f"graddrop: 'leak' must be a number or a sequence of numbers in [0, 1], "
                     f"got {leak!r}")
  per_task = np.ndim(leak) > 0

  def init(num_tasks, grads_like=None):
    if per_task and leaks.size != num_tasks:
      raise ValueError(f"graddrop: 'leak' has {leaks.size} entries, expected one per task "
                       f"({num_tasks})")
    return stateless_init(num_tasks, grads_like)

  def update(task_grads, state, *, losses=None, key=None):
    del losses
    _require_key("graddrop", key)
    num_tasks = num_tasks_of(task_grads)
    leaves, treedef = jax.tree_util.tree_flatten(task_grads)
    sizes = [leaf[0].size for leaf in leaves]
    uniform = jax.random.uniform(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
      u = uniform[start:start + size].reshape(leaf.shape[1:])
      start += size
      g = leaf.astype(jnp.float32)
      purity = 0.5 * (1.0 + safe_div(jnp.sum(g, 0), jnp.sum(jnp.abs(g), 0)))
      mask = ((purity > u) & (g > 0)) | ((purity < u) & (g < 0))
      lk = jnp.asarray(leaks if per_task else leaks[0], jnp.float32)
      lk = lk.reshape((-1,) + (1,) * (g.ndim - 1)) if per_task else lk
      out.append(jnp.sum(g * (lk + (1.0 - lk) * mask), 0).astype(leaf.dtype))
    weights = jnp.full((num_tasks,), jnp.nan, jnp.float32)
    return jax.tree_util.tree_unflatten(treedef, out), state, weights

  return Method(init, update, "gradient")


# ---------------------------------------------------------------------------------------------
# Aligned-MTL

_SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_matrix(g: jax.Array, scale_mode: str = "min") -> jax.Array:
  """The ``(T, T)`` alignment matrix ``B`` of Aligned-MTL (Senushkin et al., 2023).

  With ``G = V Λ V^T`` (the Gram matrix), ``B = sqrt(λ_s) V Λ^{-1/2} V^T``, restricted to the
  eigenvalues above the reference code's tolerance ``max(λ) · T · eps_float32`` (rank
  deficiency). The aligned gradients ``ĝ_k = Σ_t B[t, k] g_t`` are orthogonal with equal norm
  ``sqrt(λ_s)`` (Gram ``λ_s I`` on the kept eigen-space). ``λ_s`` is the smallest kept eigenvalue
  (``"min"``, the paper and LibMTL), the lower median (``"median"``) or the mean (``"rmse"``) of
  the kept ones, as in SamsungLabs/MTL's ``ProcrustesSolver``.
  """
  num_tasks = g.shape[0]
  lam, v = jnp.linalg.eigh(g)  # ascending
  keep = lam > jnp.max(lam) * num_tasks * _EPS32
  rank = jnp.sum(keep)
  inv_sqrt = jnp.where(keep, 1.0 / safe_sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(keep, lam, jnp.inf))
  elif scale_mode == "median":
    index = jnp.clip(num_tasks - rank + (rank - 1) // 2, 0, num_tasks - 1)
    scale = lam[index]
  else:
    scale = safe_div(jnp.sum(jnp.where(keep, lam, 0.0)), rank.astype(lam.dtype))
  scale = jnp.where(rank > 0, scale, 0.0)
  return safe_sqrt(scale) * _mm(v * inv_sqrt, v.T)


def aligned_mtl(scale_mode: str = "min") -> Method:
  """Aligned-MTL (Senushkin et al., 2023, "Independent Component Alignment for MTL").

  Aligns the principal components of the gradient matrix so that its condition number is 1
  (the stability criterion), then sums the aligned gradients: ``weights = B 1``
  (:func:`aligned_mtl_matrix`; the reference code, LibMTL's ``Aligned_MTL.py`` and
  SamsungLabs/MTL, sums the aligned columns, i.e. task preferences ``α = 1``).
  ``scale_mode="min"`` as the paper and both reference codes.
  """
  if scale_mode not in _SCALE_MODES:
    raise ValueError(f"aligned_mtl: 'scale_mode' must be one of {_SCALE_MODES}, got {scale_mode!r}")

  init = stateless_init

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    g = _scaled(g)
    return _sum_if_zero(g, jnp.sum(aligned_mtl_matrix(g, scale_mode), axis=1)), state

  return gram_method(init, from_gram)


# ---------------------------------------------------------------------------------------------
# ConFIG


def _pinv_psd(m: jax.Array, rtol: float) -> jax.Array:
  """Pseudo-inverse of a symmetric PSD matrix, dropping eigenvalues ``<= rtol · max(λ)``."""
  lam, v = jnp.linalg.eigh(m)
  keep = lam > rtol * jnp.max(lam)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
  return _mm(v * inv, v.T)


def con_fig_weights(g: jax.Array) -> jax.Array:
  """ConFIG's weights from the Gram matrix ``g`` (Liu et al., 2024).

  With unit gradients ``u_t`` (rows of ``U``), the direction ``x = U^T (U U^T)^+ 1`` (the
  minimum-norm solution of ``U x = 1``, what the reference's ``lstsq`` returns) has the same
  positive cosine ``1/|x|`` with every task gradient; the update is ``ĝ = x / |x|`` scaled by
  ``Σ_t <g_t, ĝ>`` (the reference ``ProjectionLength``). Returns ``w`` with update ``Σ_t w_t g_t``.
  """
  num_tasks = g.shape[0]
  norms = safe_sqrt(jnp.diag(g))
  inv_norms = safe_div(1.0, norms)
  unit_gram = g * inv_norms[:, None] * inv_norms[None, :]
  # Gram-based in float32: eigenvalues carry errors of a few T·eps, so cut above them.
  a = _mm(_pinv_psd(unit_gram, 10.0 * num_tasks * _EPS32), jnp.ones((num_tasks,), g.dtype))
  unit_dots = _mm(unit_gram, a)  # <u_t, x>
  x_norm = safe_sqrt(jnp.dot(a, unit_dots, precision=_HIGHEST))
  length = safe_div(jnp.sum(norms * unit_dots), x_norm)  # Σ_t <g_t, x / |x|>
  return safe_div(length, x_norm) * a * inv_norms


def con_fig() -> Method:
  """ConFIG, conflict-free inverse gradients (Liu et al., 2024).

  The update has an equal, positive cosine similarity with every task gradient (so it
  conflicts with none) and the length ``Σ_t <g_t, ĝ>``; see :func:`con_fig_weights`. Computed
  from the Gram matrix with a pseudo-inverse, so rank deficiency (identical or opposite
  gradients, zero gradients) gives finite results: identical gradients give their sum.
  Defaults as the reference ``ConFIGOperator`` (equal weights, projection length).
  """
  init = stateless_init

  def from_gram(g, state, *, losses=None, key=None):
    del losses, key
    g = _scaled(g)
    return _sum_if_zero(g, con_fig_weights(g)), state

  return gram_method(init, from_gram)


# ---------------------------------------------------------------------------------------------
# MoCo


class MoCoState(NamedTuple):
  """``y``: per-task gradient estimates (``grads_like`` with a leading task axis, float32);
  ``lambd``: ``(T,)`` weights on the simplex; ``step``: number of updates done."""

  y: Any
  lambd: jax.Array
  step: jax.Array


_LAMBDA_UPDATES = ("projection", "softmax")


def _sq_norms(task_grads) -> jax.Array:
  def leaf(g):
    g = g.astype(jnp.float32)
    return jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
  return sum(leaf(g) for g in jax.tree_util.tree_leaves(task_grads))


def moco(beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = True,
         lambda_update: str = "projection") -> Method:
  """MoCo (Fernando et al., 2023, "Mitigating Gradient Bias in MOL", Alg. 1).

  At step ``t`` (from 1), with ``β_t = beta / t^beta_sigma`` and ``γ_t = gamma / t^gamma_sigma``:
  ``y_t <- y_t - β_t (y_t - h_t)`` (gradient tracking), ``λ <- Π_Δ(λ - γ_t (Y Y^T + ρ I) λ)``,
  direction ``Y^T λ``. ``h_t = L_t g_t / |g_t|`` when ``normalize`` (what LibMTL's ``MoCo.py`` and
  the authors' code do), else ``h_t = g_t``. ``lambda_update="projection"`` is the paper's
  Euclidean projection onto the simplex; ``"softmax"`` is what both reference codes do instead
  (``λ <- softmax(...)``). The numeric defaults are LibMTL's. ``weights`` are ``λ``: the combined
  direction is ``Σ_t λ_t y_t``, built from the tracked ``y``, not from this step's gradients.
  """
  if lambda_update not in _LAMBDA_UPDATES:
    raise ValueError(f"moco: 'lambda_update' must be one of {_LAMBDA_UPDATES}, "
                     f"got {lambda_update!r}")

  def init(num_tasks, grads_like=None):
    if grads_like is None:
      raise ValueError("moco: init needs `grads_like` (a pytree shaped like one task's gradient) "
                       "to allocate its per-task gradient estimates y")
    y = jax.tree_util.tree_map(
        lambda x: jnp.zeros((num_tasks,) + jnp.shape(x), jnp.float32), grads_like)
    lambd = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    return MoCoState(y=y, lambd=lambd, step=jnp.zeros((), jnp.int32))

  def update(task_grads, state, *, losses=None, key=None):
    del key
    num_tasks = num_tasks_of(task_grads)
    step = state.step + 1
    t = step.astype(jnp.float32)
    beta_t = beta / t**beta_sigma
    gamma_t = gamma / t**gamma_sigma
    if normalize:
      if losses is None:
        raise ValueError("moco: normalize=True scales each gradient by its loss; pass `losses`")
      scale = safe_div(jnp.asarray(losses, jnp.float32), safe_sqrt(_sq_norms(task_grads)))
    else:
      scale = jnp.ones((num_tasks,), jnp.float32)

    def track(y, g):
      h = scale.reshape((-1,) + (1,) * (g.ndim - 1)) * g.astype(jnp.float32)
      return y - beta_t * (y - h)

    y = jax.tree_util.tree_map(track, state.y, task_grads)
    m = gram(y) + rho * jnp.eye(num_tasks, dtype=jnp.float32)
    lambd = state.lambd - gamma_t * _mm(m, state.lambd)
    if lambda_update == "projection":
      lambd = optax.projections.projection_simplex(lambd)
    else:
      lambd = jax.nn.softmax(lambd)
    combined = jax.tree_util.tree_map(lambda c, g: c.astype(g.dtype), weighted_sum(y, lambd),
                                      task_grads)
    return combined, MoCoState(y=y, lambd=lambd, step=step), lambd

  return Method(init, update, "gradient")


METHODS = {
    "pcgrad": pcgrad,
    "gradvac": gradvac,
    "graddrop": graddrop,
    "aligned_mtl": aligned_mtl,
    "con_fig": con_fig,
    "moco": moco,
}
