"""Chunks of tasks at the parameter level (``task_chunk``): the same Gram matrix and update as
stacking every task's gradient, and clear errors where chunks do not apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax import weighting
from mtjax.train import step as step_lib
from mtjax.weighting.base import gram, weighted_sum
from tests.helpers import scenes, tiny_setup, tiny_trainer

BATCH = 4
SIZE = 16
CHUNKS = (1, 2, 3)
ONE = jax.devices()[:1]  # 4 tasks: 3 does not divide them
METHODS = ("mgda", "pcgrad")  # a solver, a random task order (MoDo, stateful: below)


def _close(a, b, rtol=2e-4, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_chunked_gram_and_updates_match_stacked_gradients():
  model, tasks, _ = tiny_setup()
  _, state, _ = tiny_trainer(weighting.get("mgda"), devices=ONE, batch=BATCH, size=SIZE)
  methods = {name: weighting.get(name) for name in METHODS}
  states = {name: m.init(len(tasks)) for name, m in methods.items()}
  key = jax.random.PRNGKey(3)
  weights = jnp.asarray([0.7, -0.2, 1.3, 0.4])

  @jax.jit
  def run(params, batch_stats, batch):
    terms = step_lib.task_terms(model, tasks, params, batch_stats, batch)
    task_grads, finish = terms.per_task()
    out = {"gram": gram(task_grads), "combined": finish(weighted_sum(task_grads, weights))}
    for chunk in CHUNKS:
      out[f"gram/{chunk}"], chunk_finish = terms.gram_terms(chunk)
      out[f"combined/{chunk}"] = chunk_finish(weights)
    for name, method in methods.items():
      for chunk in (0, 3):
        out[f"{name}/{chunk}"] = step_lib.balance(terms, method, states[name], key, chunk)
    return out

  out = jax.device_get(run(state.params, state.batch_stats,
                           jax.tree_util.tree_map(jnp.asarray, scenes(BATCH, SIZE))))
  scale = np.max(np.abs(out["gram"]))
  assert scale > 0
  for chunk in CHUNKS:
    np.testing.assert_allclose(out[f"gram/{chunk}"], out["gram"], rtol=1e-4, atol=1e-5 * scale)
    _close(out[f"combined/{chunk}"], out["combined"])
  for name in METHODS:  # (gradients, weighting state, weights)
    _close(out[f"{name}/3"], out[f"{name}/0"], rtol=1e-3, atol=1e-5)


def test_chunked_trainer_matches_unchunked_over_steps():
  # A stateful method (MoDo's λ) through the jitted step: two steps, same state; the conflict
  # metrics of the chunked step (from its Gram matrix) equal those of the stacked gradients.
  batch = scenes(BATCH, SIZE)
  results = []
  for chunk in (0, 3):
    method = weighting.get("modo", gamma=0.1, double_sampling=False)  # chunks: one sample
    trainer, state, mesh = tiny_trainer(method, devices=ONE, batch=BATCH, size=SIZE,
                                        task_chunk=chunk, conflict_every=1)
    assert trainer.conflict_level == "parameter"
    for _ in range(2):
      state, metrics = trainer.step(state, step_lib.shard_batch(batch, mesh))
    results.append(jax.device_get((state, metrics)))
  cosine = results[0][1]["conflict/cosine"]
  assert cosine.shape == (4, 4) and np.all(results[0][1]["conflict/grad_norm"] > 0)
  assert np.any(np.abs(cosine - np.eye(4)) > 1e-3)  # not a trivial matrix
  _close(results[1], results[0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method,level,chunk,match", [
    ("ew", "parameter", 2, r"task_chunk: got 2.*no 'from_gram'"),
    ("gradnorm", "parameter", 2, r"task_chunk: got 2.*no 'from_gram'"),
    ("mgda", "representation", 2, r"task_chunk: got 2 with grad_level='representation'"),
    ("mgda", "parameter", -1, r"task_chunk: got -1; expected an int >= 0"),
])
def test_task_chunk_errors(method, level, chunk, match):
  with pytest.raises(ValueError, match=match):
    tiny_trainer(weighting.get(method), grad_level=level, devices=ONE, batch=BATCH, size=SIZE,
                 task_chunk=chunk)


def test_task_chunk_needs_a_shared_encoder():
  model, _, _ = tiny_setup()

  class NoEncoder:  # what the cross-stitch models look like to the check
    pass

  with pytest.raises(ValueError, match=r"task_chunk: got 2, but NoEncoder has no shared encoder"):
    step_lib.check_task_chunk(NoEncoder(), weighting.get("mgda"), "parameter", 2)
  step_lib.check_task_chunk(model, weighting.get("mgda"), "parameter", 2)  # fine
