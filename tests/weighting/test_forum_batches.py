"""FORUM trains on the meta batch's gradients, so its lower-level and meta batches are the two
halves of one train batch (LibMTL's ``Trainer.train_bilevel``): the trainer's step equals the
meta step on the halves, no meta batch is drawn, and a validation meta split is refused."""

import jax
import numpy as np
import optax
import pytest

from mtjax import weighting
from mtjax.errors import UserError
from mtjax.train import loop, setup
from mtjax.train import meta as meta_lib
from mtjax.train.step import task_terms
from mtjax.train.trainer import make_trainer
from tests.helpers import tiny_config
from tests.weighting import linear_meta


def test_step_takes_both_batches_from_one_batch():
  p = linear_meta.problem(seed=7, n=16)
  method = weighting.get("forum", inner_steps=2)
  trainer = make_trainer(p.model, p.tasks, method, optax.sgd(1.0), image_shape=(5,),
                         batch_size=16, donate=False)
  state = trainer.init(jax.random.PRNGKey(0))
  inner, outer = meta_lib.split_batch(p.batch)
  assert jax.tree_util.tree_leaves(inner)[0].shape[0] == 8

  def expected(state):
    key = jax.random.fold_in(state.key, state.step)
    terms = task_terms(p.model, p.tasks, state.params, state.batch_stats, inner)
    return meta_lib.meta_step(p.model, p.tasks, method, state, terms, inner, outer, None, key)

  grads, wstate, _, _ = jax.jit(expected)(state)
  new, _ = trainer.step(state, p.batch)  # no meta batch: FORUM needs none
  step_params = jax.tree_util.tree_map(lambda a, g: a - g, state.params, grads)
  np.testing.assert_allclose(new.params["Dense_0"]["kernel"], step_params["Dense_0"]["kernel"],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new.weighting_state.lam, wstate.lam, rtol=1e-5, atol=1e-7)
  assert float(np.abs(np.asarray(grads["Dense_0"]["kernel"])).max()) > 0
  # the separate meta batch, if one is passed, is not used
  again, _ = trainer.step(state, p.batch, p.meta_batch)
  np.testing.assert_array_equal(again.params["Dense_0"]["kernel"], new.params["Dense_0"]["kernel"])


def test_which_methods_split_the_batch():
  split = [n for n in weighting.names() if meta_lib.trains_on_meta(weighting.get(n))]
  assert split == ["forum"]
  assert not meta_lib.draws_meta_batch(weighting.get("forum"))
  assert meta_lib.draws_meta_batch(weighting.get("auto_lambda"))
  assert not meta_lib.draws_meta_batch(weighting.get("ew"))


def test_refuses_a_validation_meta_split(tmp_path):
  cfg = tiny_config(tmp_path, method="forum", meta_split="validation")
  with pytest.raises(UserError, match=r"^config\.meta_split: got 'validation'.*validation set"):
    setup.build(cfg)
  setup.build(tiny_config(tmp_path, method="auto_lambda", meta_split="validation"))


def test_refuses_a_batch_it_cannot_halve():
  p = linear_meta.problem(seed=7, n=16)
  with pytest.raises(ValueError, match=r"^batch_size: got 7 .*expected a multiple of"):
    make_trainer(p.model, p.tasks, weighting.get("forum"), optax.sgd(1.0), image_shape=(5,),
                 batch_size=7)


def test_loop_trains_forum_without_a_meta_batch(tmp_path, monkeypatch):
  """The loop draws no separate meta batch for FORUM: ``pipeline.train_batch`` is called once
  per step (the train batch), with the train seed only."""
  from mtjax.data import pipeline
  seeds = []
  draw = pipeline.train_batch

  def counting(*args, **kwargs):
    seeds.append(kwargs.get("seed"))
    return draw(*args, **kwargs)

  monkeypatch.setattr(pipeline, "train_batch", counting)
  cfg = tiny_config(tmp_path / "data", method="forum", num_steps=2, eval_every=0, batch_size=16,
                    checkpoint_every=0, **{"weighting.inner_steps": 1})
  loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert seeds and cfg.seed + 1 not in seeds
