"""Random Jacobians ``J`` (rows: tasks) of a given rank and stationarity class, as torchjd's
aggregator tests draw them (``tests/unit/aggregation/_matrix_samplers.py``, TorchJD/torchjd):

* ``normal``: ``U S Vᵀ`` with random orthonormal ``U, V`` and ``|N(0, 1)|`` singular values;
* ``strong``: strongly stationary, ``vᵀ J = 0`` for some ``v > 0`` (0 in the relative interior of
  the convex hull of the rows: every method that is non-conflicting must return 0);
* ``strictly_weak``: ``vᵀ J = 0`` for some ``v >= 0, v ≠ 0`` but for no ``v > 0``;
* ``non_weak``: ``vᵀ J ≠ 0`` for every ``v >= 0, v ≠ 0`` (0 outside the hull).
"""

import numpy as np


def _complement(q, rng):
  m, k = q.shape
  a = rng.normal(size=(m, m - k))
  return np.linalg.qr(a - q @ (q.T @ a))[0]


def _orthonormal(dim, rng):
  return _complement(np.zeros((dim, 0)), rng)


def _singular(rank, rng):
  return np.diag(np.abs(rng.normal(size=rank)))


def normal(m, n, rank, rng):
  u, vt = _orthonormal(m, rng), _orthonormal(n, rng)
  return u[:, :rank] @ _singular(rank, rng) @ vt[:rank]


def strong(m, n, rank, rng):
  v = np.abs(rng.normal(size=m))
  u1 = (v / np.linalg.norm(v))[:, None]
  return _complement(u1, rng)[:, :rank] @ _singular(rank, rng) @ _orthonormal(n, rng)[:rank]


def strictly_weak(m, n, rank, rng):
  u = np.abs(rng.normal(size=m))
  split, perm = rng.integers(1, m), rng.permutation(m)
  v, v_prime = np.zeros(m), np.zeros(m)
  a, b = perm[:split], perm[split:]
  v[a], v_prime[b] = u[a] / np.linalg.norm(u[a]), u[b] / np.linalg.norm(u[b])
  u1 = np.stack([v, v_prime]).T
  full = np.hstack([u1, _complement(u1, rng)])
  return full[:, 1:rank + 1] @ _singular(rank, rng) @ _orthonormal(n, rng)[:rank]


def non_weak(m, n, rank, rng):
  u = np.abs(rng.normal(size=m))
  u1 = (u / np.linalg.norm(u))[:, None]
  full = np.hstack([u1, _complement(u1, rng)])
  return full[:, :rank] @ _singular(rank, rng) @ _orthonormal(n, rng)[:rank]
