"""Properties of every Gram-based aggregator (``method.from_gram``), as torchjd's own aggregator
suite states them (``tests/unit/aggregation/_asserts.py``, TorchJD/torchjd), on Jacobians drawn
as it draws them (:mod:`tests.weighting.jacobians`, 8 tasks × 12 parameters, float32):

* structure: a finite direction of the parameters' shape, at scales 0 to 1e15 (every method);
* non-conflicting: ``J d >= 0`` (``| |(J d)₊| − |J d| | <= tol (1 + |J d|)``);
* zero at strong stationarity: a non-conflicting method returns ``d = 0`` when ``vᵀ J = 0`` for
  some ``v > 0`` (``J d >= 0`` and ``vᵀ J d = 0`` force ``J d = 0``; ``d`` is in the rows' span);
* permutation invariance: permuting the tasks leaves ``d`` unchanged (elementwise
  ``|d − d_π| <= tol (1 + |d|)``, torchjd's ``assert_close`` with ``atol = rtol = tol``);
* linearity under scaling: ``A(diag(αc₁ + βc₂) J) = α A(diag(c₁) J) + β A(diag(c₂) J)``;
* strong stationarity: ``|A(J)| > threshold`` when ``J`` is not strongly stationary.

``PROPERTIES`` lists what each method claims and the tolerance measured for it (torchjd's
tolerances where mtjax's float32 solvers meet them; the number measured, rounded up, where they
do not). Every registered Gram-based method must appear there, so a new one is covered. Each
method is compiled once: all matrices of a property run as one ``vmap``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from tests.weighting import jacobians

T, D = 8, 12
SCALES = (0.0, 1e-10, 1e3, 1e5, 1e10, 1e15)

# method -> {property: tolerance}; the hyperparameters of a variant follow its name.
PROPERTIES = {
    # UPGrad and DualProj: zero at strong stationarity only up to their ridge ``reg_eps`` (as
    # torchjd's, whose suite does not claim it); measured |d| / |J| there: 4e-3 and 2.5e-3.
    "upgrad": {"non_conflicting": 4e-4, "permutation": 1e-6, "linear": 6e-2,
               "strongly_stationary": 5e-3},
    "dualproj": {"non_conflicting": 4e-4, "permutation": 5e-7, "strongly_stationary": 3e-3},
    "mgda": {"non_conflicting": 4e-4, "zero_at_strong": 1e-3, "permutation": 2e-4},
    "con_fig": {"permutation": 1e-4, "linear": 1e-4},
    "cagrad": {"permutation": 1e-4},
    "cagrad c=1": {"non_conflicting": 4e-4, "zero_at_strong": 1e-4},
    "cagrad c=2": {"non_conflicting": 4e-4, "zero_at_strong": 1e-5},
    "imtl": {"permutation": 1e-4},
    "aligned_mtl": {"permutation": 1e-4},
    "nash_mtl": {"permutation": 5e-3},   # measured 2.8e-3 (20 damped Newton steps)
    "fairgrad": {"permutation": 1e-1},   # measured 6.2e-2: 30 fixed iterations do not converge
    "sdmgrad": {"permutation": 5e-4},    # measured 2.4e-4
    "modo": {"permutation": 1e-4},
    "pcgrad": {},    # a random order of projections per step: not permutation invariant
    "gradvac": {},   # the same, plus its moving targets
}
VARIANTS = {"cagrad c=1": ("cagrad", {"c": 1.0, "num_iters": 100}),
            "cagrad c=2": ("cagrad", {"c": 2.0, "num_iters": 100})}


def _method(entry):
  name, hparams = VARIANTS.get(entry, (entry, {}))
  return weighting.get(name, **hparams)


def _gram_methods():
  return sorted(n for n in weighting.names() if weighting.get(n).from_gram is not None)


def test_every_gram_method_declares_its_properties():
  declared = {VARIANTS.get(e, (e, {}))[0] for e in PROPERTIES}
  assert declared == set(_gram_methods())


def _draw():
  rng = np.random.default_rng(0)
  ranks = (1, 4, T - 1)
  out = {"zero": [np.zeros((T, D))],
         "normal": [jacobians.normal(T, D, r, rng) for r in (1, 4, T)]}
  for kind in ("strong", "strictly_weak", "non_weak"):
    out[kind] = [getattr(jacobians, kind)(T, D, r, rng) for r in ranks]
  out["scaled"] = [s * m for s in SCALES for m in out["normal"]]
  return out, rng


MATRICES, _RNG = _draw()
TYPICAL = np.stack([m for k in ("zero", "normal", "strong", "strictly_weak", "non_weak")
                    for m in MATRICES[k]])


def _aggregate(entry):
  """``A(J)`` for a stack of Jacobians ``(N, T, D)``, float32, one compile."""
  method = _method(entry)
  state = method.init(T, jnp.zeros((D,), jnp.float32))

  def one(j):
    return method.update(j, state, losses=jnp.ones((T,), jnp.float32),
                         key=jax.random.PRNGKey(0))[0]
  batched = jax.jit(jax.vmap(one))
  return lambda js: np.asarray(batched(jnp.asarray(js, jnp.float32)), np.float64)


_CACHE = {}


def _agg(entry):
  if entry not in _CACHE:
    _CACHE[entry] = _aggregate(entry)
  return _CACHE[entry]


def _has(prop):
  return [e for e, props in PROPERTIES.items() if prop in props]


@pytest.mark.parametrize("entry", list(PROPERTIES))
def test_expected_structure(entry):
  js = np.concatenate([TYPICAL, np.stack(MATRICES["scaled"])])
  out = _agg(entry)(js)
  assert out.shape == (len(js), D)
  assert np.all(np.isfinite(out)), entry


@pytest.mark.parametrize("entry", _has("non_conflicting"))
def test_non_conflicting(entry):
  tol = PROPERTIES[entry]["non_conflicting"]
  d = np.einsum("ntd,nd->nt", TYPICAL, _agg(entry)(TYPICAL))
  norm = np.linalg.norm(d, axis=1)
  gap = np.abs(np.linalg.norm(np.maximum(d, 0.0), axis=1) - norm)
  assert np.all(gap <= tol * (1.0 + norm)), (entry, gap.max())


@pytest.mark.parametrize("entry", _has("zero_at_strong"))
def test_zero_at_strong_stationarity(entry):
  tol = PROPERTIES[entry]["zero_at_strong"]
  js = np.stack(MATRICES["strong"])
  out = _agg(entry)(js)
  rel = np.linalg.norm(out, axis=1) / np.linalg.norm(js, axis=(1, 2))
  assert np.all(rel <= tol), (entry, rel)


@pytest.mark.parametrize("entry", _has("permutation"))
def test_permutation_invariant(entry):
  tol = PROPERTIES[entry]["permutation"]
  rng = np.random.default_rng(1)
  perms = [rng.permutation(T) for _ in range(3)]
  js = np.concatenate([TYPICAL] + [TYPICAL[:, p] for p in perms])
  out = _agg(entry)(js).reshape(1 + len(perms), len(TYPICAL), D)
  err = np.abs(out[1:] - out[0]) / (1.0 + np.abs(out[0]))
  assert err.max() <= tol, (entry, err.max())


@pytest.mark.parametrize("entry", _has("linear"))
def test_linear_under_scaling(entry):
  tol = PROPERTIES[entry]["linear"]
  rng = np.random.default_rng(2)
  c1, c2 = rng.uniform(size=(2, len(TYPICAL), T))
  alpha, beta = rng.uniform(size=2)
  scaled = lambda c: c[:, :, None] * TYPICAL  # noqa: E731
  out = _agg(entry)(np.concatenate([scaled(c1), scaled(c2), scaled(alpha * c1 + beta * c2)]))
  x1, x2, x = np.split(out, 3)
  expected = alpha * x1 + beta * x2
  err = np.abs(x - expected) / (1.0 + np.abs(expected))
  assert err.max() <= tol, (entry, err.max())


@pytest.mark.parametrize("entry", _has("strongly_stationary"))
def test_strongly_stationary(entry):
  threshold = PROPERTIES[entry]["strongly_stationary"]
  js = np.stack(MATRICES["strictly_weak"] + MATRICES["non_weak"])
  norms = np.linalg.norm(_agg(entry)(js), axis=1)
  assert np.all(norms > threshold), (entry, norms.min())


@pytest.mark.parametrize("c", [-1.0, -1e-3, float("nan")])
def test_cagrad_refuses_a_negative_radius(c):
  with pytest.raises(ValueError, match=r"cagrad: c=.*expected a number >= 0"):
    weighting.get("cagrad", c=c)


@pytest.mark.parametrize("leak", [[0.1, 0.2], [], [0.1, 1.5], [[0.1, 0.2, 0.3]]])
def test_graddrop_refuses_a_leak_of_the_wrong_length(leak):
  with pytest.raises(ValueError, match=r"graddrop: 'leak'"):
    weighting.get("graddrop", leak=leak).init(3)


def test_graddrop_per_task_leak():
  """Leak 1 passes task 0's gradient whole; leak 0 keeps task 1's only where its sign wins."""
  j = np.array([[1.0, -2.0, 3.0], [-1.0, 1.0, 2.0]], np.float32)
  key = jax.random.PRNGKey(3)
  method = weighting.get("graddrop", leak=[1.0, 0.0])
  out = np.asarray(method.update(jnp.asarray(j), method.init(2), key=key)[0])
  u = np.asarray(jax.random.uniform(key, (3,), jnp.float32))
  purity = 0.5 * (1.0 + j.sum(0) / np.abs(j).sum(0))
  mask = ((purity > u) & (j[1] > 0)) | ((purity < u) & (j[1] < 0))
  np.testing.assert_allclose(out, j[0] + j[1] * mask, rtol=1e-6)
