"""STCH (Lin et al. 2024): smooth Tchebycheff scalarisation on log-normalised losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtjax.weighting as W
from tests.weighting import common

KEY = jax.random.PRNGKey(0)
NAME = "stch"


@pytest.mark.parametrize("check", common.CONTRACT_CHECKS, ids=common.check_id)
def test_contract(check):
  check(W.get(NAME))


def _objective(losses, nadir, mu, pref):
  """The official MTL objective: T μ log Σ_t exp(λ_t log(L_t / z_t + 1e-20) / μ)."""
  ell = pref * jnp.log(losses / nadir + 1e-20)
  return losses.shape[0] * mu * jax.scipy.special.logsumexp(ell / mu)


def test_warmup_nadir_and_weights_are_the_objective_gradient():
  """Calls 0-1: warm-up; calls 2-4 averaged into z (weights 1/L until then); call 5: the
  gradient of the objective at z (autodiff)."""
  mu, pref = 0.3, jnp.array([1.0, 0.5, 2.0])
  method = W.get(NAME, mu=mu, warmup_steps=2, nadir_steps=3, pref_vector=(1.0, 0.5, 2.0))
  rng = np.random.default_rng(0)
  history = jnp.asarray(rng.uniform(0.5, 3.0, size=(6, 3)), jnp.float32)
  state = method.init(3)
  update = jax.jit(method.update)
  for k in range(5):
    _, state, w = update(None, state, losses=history[k], key=KEY)
    np.testing.assert_allclose(w, 1.0 / history[k], rtol=1e-6)
  nadir = jnp.mean(history[2:5], axis=0)
  np.testing.assert_allclose(state.reference, nadir, rtol=1e-6)
  grads = jax.random.normal(KEY, (3, 5))
  combined, state, w = update(grads, state, losses=history[5], key=KEY)
  expected = jax.grad(_objective)(history[5], nadir, mu, pref)
  np.testing.assert_allclose(w, expected, rtol=1e-5)
  np.testing.assert_allclose(combined, w @ grads, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.reference, nadir, rtol=1e-6)  # kept after the window


def test_small_mu_is_the_tchebycheff_scalarisation():
  """μ → 0: the weights tend to the gradient of T max_t λ_t ℓ_t, i.e. T λ_k / L_k on the worst
  task k and 0 elsewhere; the objective lies in [T max, T (max + μ log T)] (Eq. 8)."""
  pref = jnp.array([1.0, 2.0, 0.5])
  nadir = jnp.array([1.0, 1.0, 2.0])
  losses = jnp.array([1.5, 1.2, 3.0])  # λ ℓ = [0.405, 0.365, 0.203]: task 0 is the worst
  ell = pref * jnp.log(losses / nadir)
  for mu in (1.0, 0.1, 0.01):
    value = float(_objective(losses, nadir, mu, pref))
    assert 3 * float(jnp.max(ell)) - 1e-5 <= value <= 3 * (float(jnp.max(ell)) + mu * np.log(3))
  method = W.get(NAME, mu=1e-3, pref_vector=(1.0, 2.0, 0.5))
  _, state, _ = method.update(None, method.init(3), losses=nadir, key=KEY)  # z = nadir
  _, _, w = method.update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(w, [3 * 1.0 / 1.5, 0.0, 0.0], atol=1e-6)


def test_losses_at_the_nadir_and_zero_losses():
  """L = z: ℓ = 0, softmax uniform, so w_t = λ_t / L_t (the warm-up weights for λ = 1)."""
  method = W.get(NAME)
  losses = jnp.array([0.2, 1.0, 5.0])
  _, state, _ = method.update(None, method.init(3), losses=losses, key=KEY)
  _, state, w = method.update(None, state, losses=losses, key=KEY)
  np.testing.assert_allclose(w, 1.0 / losses, rtol=1e-6)
  for zero in ([0.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
    _, state, w = method.update(None, state, losses=jnp.array(zero), key=KEY)
    assert bool(jnp.all(jnp.isfinite(w)))


def test_hyperparameters_are_checked():
  with pytest.raises(ValueError, match="mu"):
    W.get(NAME, mu=0.0)
  with pytest.raises(ValueError, match="nadir_steps"):
    W.get(NAME, nadir_steps=0)
  with pytest.raises(ValueError, match="pref_vector"):
    W.get(NAME, pref_vector=(1.0, 2.0)).init(3)


def test_without_grads_returns_none():
  common.check_without_grads_returns_none(W.get(NAME))
