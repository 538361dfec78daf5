"""Small fixed-iteration float32 solvers on the ``(T, T)`` Gram matrix, used by the methods.

Every solver runs a fixed number of iterations on device (``lax.fori_loop``), is jittable and
vmappable, and works from the Gram matrix alone. Accuracy (checked against exact float64
active-set enumeration in ``tests/weighting/test_solvers.py``): on random and adversarial
(ill-conditioned, singular, identical, zero) Gram matrices with ``T <= 5``:
:func:`min_norm_weights` reaches the exact minimum of ``wᵀ G w / tr(G)`` to ``2e-6`` (so
``|d - d*|² <= 4e-6 tr(G)`` for the min-norm point ``d``); :func:`box_qp` on UPGrad's problems
(condition number up to 1e4) reaches the exact minimum to a relative ``1e-4`` and the minimiser to
``1e-2`` of its largest entry (typically 1e-6).
That accuracy comes from a final *polish*: the active set of the iterative solution is fixed and
the equality-constrained KKT system on it is solved exactly; the polished point is kept only when
it is feasible and no worse (so the polish can never make a result worse). :func:`box_qp` returns
the first polished point that satisfies the KKT conditions (primal and dual feasibility to
``1e-5`` of the problem's scale) outright, without comparing objectives that differ only by
rounding: UPGrad and DualProj are then invariant to a permutation of the tasks to ``1e-6`` and
``5e-7`` (elementwise, relative to ``1 + |d|``) on torchjd's test Jacobians, float32
(``tests/weighting/test_properties_gram.py``, where every Gram-based method's measured accuracy
is written down). :func:`simplex_qp` keeps the objective comparison: on degenerate problems
(``0`` in the hull of more rows than the rank) its KKT system is singular, and MGDA's default
100 iterations are permutation invariant to ``2e-4``.
"""

import jax
import jax.numpy as jnp
import optax

from mtjax.weighting.base import GRAM_TINY as _TINY
from mtjax.weighting.base import safe_div


def symmetrize(g: jax.Array) -> jax.Array:
  """``(G + G^T) / 2`` in float32: removes the asymmetry of a Gram matrix summed leaf by leaf."""
  g = jnp.asarray(g, jnp.float32)
  return 0.5 * (g + g.T)


def lipschitz_bound(q: jax.Array) -> jax.Array:
  """An upper bound on the largest eigenvalue of a symmetric ``q``: its largest absolute row sum
  (Gershgorin), at least ``_TINY``."""
  return jnp.maximum(jnp.max(jnp.sum(jnp.abs(q), axis=-1)), _TINY)


def project_simplex(y: jax.Array) -> jax.Array:
  """Euclidean projection of ``y`` onto ``{w : w >= 0, Σ w = 1}`` (exact, by sorting; optax's).

  Held, Wolfe & Crowder (1974); Duchi et al. (2008), Fig. 1.
  """
  return optax.projections.projection_simplex(jnp.asarray(y, jnp.float32))


def min_norm_2(g11, g12, g22):
  """Exact line search for two points: ``γ* = argmin_{γ∈[0,1]} |γ x1 + (1-γ) x2|²``.

  Sener & Koltun (2018), Algorithm 1: ``γ = ((x2 - x1)·x2) / |x1 - x2|²`` clipped to ``[0, 1]``
  (the reference code clips to ``[0.001, 0.999]``; this uses the exact bounds). Returns
  ``(γ, cost)``; for identical points (``|x1 - x2| = 0``) ``γ = 1/2``.
  """
  denom = g11 + g22 - 2.0 * g12
  gamma = jnp.where(denom > _TINY, jnp.clip(safe_div(g22 - g12, denom), 0.0, 1.0), 0.5)
  cost = gamma * gamma * g11 + 2.0 * gamma * (1.0 - gamma) * g12 + (1.0 - gamma) ** 2 * g22
  return gamma, cost


def best_pair_weights(g: jax.Array) -> jax.Array:
  """Simplex weights of the min-norm point over all pairs of points (segments), as the
  reference MGDA code starts from (Sener & Koltun 2018, ``_min_norm_2d``); ``T = 1`` gives
  ``[1]``."""
  g = symmetrize(g)
  t = g.shape[0]
  if t == 1:
    return jnp.ones((1,), jnp.float32)
  d = jnp.diag(g)
  gamma, cost = min_norm_2(d[:, None], g, d[None, :])
  cost = jnp.where(jnp.triu(jnp.ones((t, t), bool), 1), cost, jnp.inf)
  idx = jnp.argmin(cost)
  i, j = idx // t, idx % t
  gam = gamma.reshape(-1)[idx]
  return jnp.zeros((t,), jnp.float32).at[i].add(gam).at[j].add(1.0 - gam)


def _fista(grad_fn, project, x0, step, num_iters):
  """Accelerated projected gradient (Beck & Teboulle 2009) with the gradient restart of
  O'Donoghue & Candès (2015), for a fixed number of iterations."""
  def body(_, carry):
    x, y, t = carry
    x_new = project(y - step * grad_fn(y))
    restart = jnp.vdot(grad_fn(y), x_new - x) > 0
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    beta = jnp.where(restart, 0.0, (t - 1.0) / t_new)
    y_new = x_new + beta * (x_new - x)
    return x_new, y_new, jnp.where(restart, 1.0, t_new)
  x, _, _ = jax.lax.fori_loop(0, num_iters, body, (x0, x0, jnp.float32(1.0)))
  return x


def _pick(candidates, objective):
  """The candidate with the lowest finite objective (the first one on ties)."""
  vals = jnp.stack([objective(c) for c in candidates])
  vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
  best = jnp.argmin(vals)
  stacked = jnp.stack(candidates)
  return stacked[best]


def simplex_qp(q: jax.Array, b: jax.Array | None = None, num_iters: int = 100,
               w0: jax.Array | None = None, polish_steps: int = 4) -> jax.Array:
  """``argmin_{w ∈ Δ} ½ wᵀ q w + bᵀ w`` for a symmetric PSD ``q`` over the probability simplex.

  ``num_iters`` steps of accelerated projected gradient (step ``1 / λ_max`` bound) from ``w0``
  (default: the best pair of :func:`best_pair_weights` when ``b`` is None, else uniform), then a
  polish on the found support ``S``: the KKT system ``q_SS w_S + b_S = ν 1, Σ w_S = 1`` solved
  exactly; the feasible candidate with the lower objective is returned.
  """
  q = symmetrize(q)
  t = q.shape[0]
  if t == 1:
    return jnp.ones((1,), jnp.float32)
  if w0 is None:
    w0 = best_pair_weights(q) if b is None else jnp.full((t,), 1.0 / t, jnp.float32)
  b = jnp.zeros((t,), jnp.float32) if b is None else jnp.asarray(b, jnp.float32)
  w0 = project_simplex(w0)
  objective = lambda w: 0.5 * w @ q @ w + b @ w
  step = 1.0 / lipschitz_bound(q)
  w = _fista(lambda w: q @ w + b, project_simplex, w0, step, num_iters)
  candidates = [w, w0]
  support = w > 1e-6 * jnp.max(w)
  for _ in range(polish_steps):
    # Primal-dual active-set step (Hintermüller, Ito & Kunisch 2002) on the support S:
    # [[q_SS, 1], [1ᵀ, 0]] [w_S; -ν] = [-b_S; 1], w = 0 off S.
    m = support.astype(jnp.float32)
    kkt = jnp.zeros((t + 1, t + 1), jnp.float32)
    kkt = kkt.at[:t, :t].set(q * m[:, None] * m[None, :] + jnp.diag(1.0 - m))
    kkt = kkt.at[:t, t].set(-m).at[t, :t].set(m)
    rhs = jnp.concatenate([-b * m, jnp.ones((1,), jnp.float32)])
    # LU for the nonsingular case, least squares when the support is degenerate (e.g. 0 in the
    # hull of more than rank + 1 gradients); both are candidates.
    sol_lu, sol_ls = jnp.linalg.solve(kkt, rhs), jnp.linalg.lstsq(kkt, rhs)[0]
    ok_lu = jnp.all(jnp.isfinite(sol_lu))
    sol = jnp.where(ok_lu, sol_lu, sol_ls)
    raw, nu = sol[:t] * m, sol[t]
    ok = jnp.all(jnp.isfinite(sol))
    candidates.append(jnp.where(ok, project_simplex(raw), w))
    candidates.append(jnp.where(jnp.all(jnp.isfinite(sol_ls)), project_simplex(sol_ls[:t] * m), w))
    grad = q @ raw + b
    new_support = jnp.where(support, raw > 0, grad < nu)
    support = jnp.where(ok & jnp.any(new_support), new_support, support)
  return _pick(candidates, objective)


def min_norm_weights(g: jax.Array, num_iters: int = 100) -> jax.Array:
  """Weights ``w ∈ Δ`` of the min-norm point of the convex hull of the gradients with Gram ``g``:
  ``argmin_{w ∈ Δ} |Σ_t w_t g_t|² = wᵀ g w`` (Sener & Koltun 2018, Eq. 3 / Algorithm 2).

  Starts from the best pair (as the reference ``MinNormSolver``), then :func:`simplex_qp`
  (accelerated projected gradient + exact support polish) on ``g`` scaled to unit trace (the
  weights do not depend on the scale). An all-zero ``g`` gives the best-pair start.
  """
  g = symmetrize(g)
  g = g * safe_div(1.0, jnp.trace(g))
  return simplex_qp(g, None, num_iters)


def box_qp(q: jax.Array, b: jax.Array, lower: jax.Array, num_iters: int = 100,
           x0: jax.Array | None = None, polish_steps: int = 4) -> jax.Array:
  """``argmin_{x >= lower} ½ xᵀ q x + bᵀ x`` for a symmetric positive definite ``q``.

  ``num_iters`` steps of accelerated projected gradient (projection ``max(x, lower)``) from
  ``x0`` (default ``max(lower, 0)``), then a polish: with the free set ``F = {x_j > lower_j}``
  fixed, ``q_FF x_F = -b_F - q_FA lower_A`` solved exactly; the polished point (clipped to the
  box) is kept when its objective is no worse. For UPGrad/DualProj (Quinton & Rey 2024, Prop. 1)
  ``b = 0`` and ``q`` is the regularised normalised Gram matrix.
  """
  q = symmetrize(q)
  b = jnp.asarray(b, jnp.float32)
  lower = jnp.asarray(lower, jnp.float32)
  x0 = jnp.maximum(lower, 0.0) if x0 is None else jnp.maximum(x0, lower)
  objective = lambda x: 0.5 * x @ q @ x + b @ x
  project = lambda x: jnp.maximum(x, lower)
  step = 1.0 / lipschitz_bound(q)
  x = _fista(lambda x: q @ x + b, project, x0, step, num_iters)
  candidates = [x, x0]
  free = (x > lower) | (q @ x + b < 0)
  exact, found = x, jnp.zeros((), bool)
  scale = jnp.max(jnp.abs(q)) * jnp.maximum(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(lower))) \
      + jnp.max(jnp.abs(b))
  tol = 1e-5 * scale
  for _ in range(polish_steps):
    # Primal-dual active-set step (Hintermüller, Ito & Kunisch 2002): with the free set F fixed,
    # q_FF x_F = -b_F - q_FA lower_A; then F = {x_j > lower_j on F} ∪ {(q x + b)_j < 0 off F}.
    m = free.astype(jnp.float32)
    fixed_part = lower * (1.0 - m)
    mat = q * m[:, None] * m[None, :] + jnp.diag(1.0 - m)
    raw = jnp.linalg.solve(mat, m * (-b - q @ fixed_part) + fixed_part)
    ok = jnp.all(jnp.isfinite(raw))
    grad = q @ raw + b
    # The KKT conditions of the box QP: primal feasible on F, dual feasible (grad >= 0) off F.
    kkt = ok & jnp.all(jnp.where(free, raw >= lower - tol, grad >= -tol))
    exact = jnp.where(kkt & ~found, project(raw), exact)
    found = found | kkt
    candidates.append(jnp.where(ok, project(raw), x))
    new_free = jnp.where(free, raw > lower, grad < 0)
    free = jnp.where(ok, new_free, free)
  return jnp.where(found, exact, _pick(candidates, objective))
