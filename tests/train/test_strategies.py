"""Optimisation strategies: phases as a function of the step, frozen groups, resume mid-phase."""

import functools
import json

import jax
import numpy as np
import optax
import pytest

from mtjax import weighting
from mtjax.models import labels
from mtjax.train import figures, loop, optim, setup
from mtjax.train import step as step_lib
from mtjax.train import strategies as st
from tests.helpers import read_log, restore_latest, scenes, tiny_config, tiny_setup, tiny_trainer

NAMES = ("segmentation", "depth", "normals")


def test_phases_are_a_function_of_the_step():
  alt = {"specific_steps": 2, "shared_steps": 1}
  assert [st.phase_at("alternating", alt, NAMES, s).frozen for s in range(4)] == [
      ("shared",), ("shared",), NAMES, ("shared",)]
  taskwise = [st.phase_at("alternating_taskwise", {}, NAMES, s) for s in range(4)]
  assert [p.active for p in taskwise] == [(True, False, False), (False, True, False),
                                          (False, False, True), (True, False, False)]
  assert taskwise[1].frozen == ("segmentation", "normals")
  prog = {"initial_tasks": 1, "add_every": 3, "freeze_shared": True}
  phases = [st.phase_at("progressive", prog, NAMES, s) for s in range(8)]
  assert [sum(p.active) for p in phases] == [1, 1, 1, 2, 2, 2, 3, 3]
  assert phases[0].frozen == ("depth", "normals")
  assert phases[3].frozen == ("shared", "normals") and phases[6].frozen == ("shared",)
  assert st.phase_at("end_to_end", {}, NAMES, 123) == st.END_TO_END
  assert len(st.distinct_phases("progressive", prog, NAMES, 0, 8)) == 3


@pytest.mark.parametrize("strategy,phases,level,match", [
    ("sideways", {}, "loss", "strategy: got 'sideways'"),
    ("alternating", {}, "gradient", "loss-level"),
    ("alternating", {"shared_steps": 0}, "loss", "phases.shared_steps"),
    ("progressive", {"initial_tasks": 4}, "loss", "phases.initial_tasks"),
    ("progressive", {"add_evry": 3}, "loss", "unknown field")])
def test_bad_strategies_are_refused_naming_the_field(strategy, phases, level, match):
  with pytest.raises(ValueError, match=match):
    st.check(strategy, phases, NAMES, level)


def _opt_config(**fields):
  return optim.OptimizerSpec(**{
      "name": "adam", "learning_rate": 0.01, "schedule": "constant", "warmup_steps": 0,
      "momentum": 0.9, "weight_decay": 0.0, "grad_clip": 0.0, "lr_scale": (), "frozen": (),
      **fields})


def test_grouped_optimizer_without_freezing_is_the_plain_one_bitwise():
  params = {"shared": {"w": np.linspace(-1, 1, 6, dtype=np.float32)},
            "head": {"b": np.float32([0.5, -0.25])}}
  label_fn = lambda tree: {"shared": {"w": "shared"}, "head": {"b": "depth"}}  # noqa: E731
  plain = optim.make_optimizer(_opt_config(), 10)
  grouped = optim.make_grouped_optimizer(_opt_config(), 10, label_fn)
  ps, pg = params, params
  ss, sg = plain.init(params), grouped.init(params)
  for k in range(3):
    grads = jax.tree_util.tree_map(lambda x, k=k: np.cos(x * (k + 1)).astype(np.float32), params)
    us, ss = plain.update(grads, ss, ps)
    ug, sg = grouped.update(grads, sg, pg)
    ps, pg = optax.apply_updates(ps, us), optax.apply_updates(pg, ug)
  for x, y in zip(jax.tree_util.tree_leaves(ps), jax.tree_util.tree_leaves(pg), strict=True):
    np.testing.assert_array_equal(x, y)
  # A frozen group: zero update, state kept bitwise.
  upd, sg2 = grouped.update(grads, sg, pg, frozen=("shared",))
  np.testing.assert_array_equal(upd["shared"]["w"], 0)
  assert np.any(upd["head"]["b"] != 0)
  for x, y in zip(jax.tree_util.tree_leaves(sg[1]), jax.tree_util.tree_leaves(sg2[1]),
                  strict=True):
    np.testing.assert_array_equal(x, y)


def _tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_progressive_head_waits_and_frozen_backbone_is_bitwise_unchanged():
  names = ("segmentation", "depth")
  model, _, _ = tiny_setup(names)
  opts = {"initial_tasks": 1, "add_every": 1, "freeze_shared": True}
  trainer, state, mesh = tiny_trainer(
      weighting.get("ew"), task_names=names, batch=4, size=16, devices=jax.devices()[:1],
      optimizer=optim.make_grouped_optimizer(
          _opt_config(), 10, functools.partial(labels.label_tree, model)),
      phase_at=functools.partial(st.phase_at, "progressive", opts, names))
  batch = step_lib.shard_batch(scenes(4, size=16), mesh)
  own = lambda s: labels.split(model, jax.device_get(s.params))  # noqa: E731
  before = own(state)
  state, metrics = trainer.step(state, batch, phase=trainer.phase(0))  # segmentation only
  after0 = own(state)
  assert _tree_equal(before["depth"], after0["depth"])  # not added yet: it does not move
  assert not _tree_equal(before["segmentation"], after0["segmentation"])
  assert not _tree_equal(before["shared"], after0["shared"])
  assert float(metrics["weight/depth"]) == 0.0 and np.isfinite(float(metrics["loss/depth"]))
  groups = labels.groups(model, state.params)  # the optimizer's state: one per group, in order
  shared_at = [i for i, g in enumerate(groups) if labels.owner(g) == labels.SHARED]
  assert shared_at and len(state.opt_state) == len(groups)
  shared_state = jax.device_get([state.opt_state[i] for i in shared_at])
  # depth added, backbone frozen
  state, metrics = trainer.step(state, batch, phase=trainer.phase(1))
  after1 = own(state)
  assert _tree_equal(after0["shared"], after1["shared"])
  assert _tree_equal(shared_state, jax.device_get([state.opt_state[i] for i in shared_at]))
  assert not _tree_equal(after0["depth"], after1["depth"])
  assert float(metrics["weight/depth"]) == 1.0
  with pytest.raises(ValueError, match="phase"):
    trainer.step(state, batch)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_alternating_resumes_mid_phase_bitwise_with_one_compile_per_phase(data_dir, tmp_path):
  # Four steps: the heads train at steps 0-1, the backbone at 2-3 (0-based); conflict logging
  # is on (the default of shapes.py; tiny_config turns it off). The cut run stops after three
  # steps and resumes in the middle of the backbone phase.
  fields = {"phases.specific_steps": 2, "phases.shared_steps": 2, "num_steps": 4,
            "eval_every": 2, "checkpoint_every": 0, "relations.conflict": True}
  cfg = tiny_config(data_dir, method="dwa", strategy="alternating", prediction_images=2,
                    tensorboard=True, **fields)
  compiled = []

  def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name", ""))

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    loop.train(cfg, str(tmp_path / "full"), progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  assert compiled.count("jit(step)") == len(st.distinct_phases(
      "alternating", cfg.phases, cfg.tasks, 0, cfg.num_steps)) == 2
  # No figures in the cut run (presentation fields: the same run, one compile fewer).
  cut = tiny_config(data_dir, method="dwa", strategy="alternating", **fields)
  assert loop.train(cut, str(tmp_path / "cut"), progress=False, stop_after=3) == {}
  assert st.phase_at(cut.strategy, cut.phases, cut.tasks, 2) == st.phase_at(
      cut.strategy, cut.phases, cut.tasks, 3)  # the resumed step is mid-phase
  loop.train(cut, str(tmp_path / "cut"), progress=False)
  full, cut = restore_latest(tmp_path / "full")[1], restore_latest(tmp_path / "cut")[1]
  assert _tree_equal(full, cut)
  assert read_log(tmp_path / "full") == read_log(tmp_path / "cut")
  # What a run shows: a prediction grid at each evaluation and at the end, the conflict
  # heatmaps, TensorBoard events (presentation: the trajectory above is unchanged by them).
  for name in ("predictions/step_2.png", "predictions/step_4.png", "relations.png",
               "curves.png"):
    assert (tmp_path / "full" / name).exists(), name
  assert figures.events_in(str(tmp_path / "full"))
  out = json.loads((tmp_path / "full" / "results.json").read_text())["relations"]
  assert out["tasks"] == list(cfg.tasks) and out["conflict_cosine_count"] == 2
  assert out["conflict_level"] == "representation"  # dwa: loss level, an encoder model


def test_alternating_taskwise_through_the_loop_trains_one_head_and_the_backbone_a_step(
    data_dir, tmp_path):
  import orbax.checkpoint as ocp

  cfg = tiny_config(data_dir, strategy="alternating_taskwise", num_steps=4, log_every=1,
                    eval_every=0, checkpoint_every=1, keep_checkpoints=4,
                    **{"optimizer.schedule": "constant"})  # no warm-up: step 0 moves too
  assert loop.train(cfg, str(tmp_path), progress=False, stop_after=3) == {}  # one round
  exp = setup.build(cfg)
  before = jax.device_get(setup.make_trainer(cfg, exp, step_lib.make_mesh()).init(
      jax.random.PRNGKey(cfg.seed)).params)
  records = [r for r in read_log(tmp_path) if r["split"] == "train"]
  for done, record in zip((1, 2, 3), records, strict=True):
    after = ocp.StandardCheckpointer().restore(
        str(tmp_path / "checkpoints" / str(done) / "state"))["params"]
    old, new = labels.split(exp.model, before), labels.split(exp.model, after)
    moved = {owner for owner in new if not _tree_equal(old[owner], new[owner])}
    task = cfg.tasks[done - 1]  # step done - 1 (0-based) trains task (done - 1) % T
    assert moved == {labels.SHARED, task}, (done, moved)
    assert record["step"] == done
    assert [record[f"weight/{n}"] for n in cfg.tasks] == [float(n == task) for n in cfg.tasks]
    before = after


@pytest.mark.parametrize("overrides,match", [
    ({"strategy": "sideways"}, "config.strategy: got 'sideways'"),
    ({"strategy": "alternating", "method": "mgda"}, "config.strategy: 'alternating' needs a "
                                                    "loss-level"),
    ({"strategy": "progressive", "phases.add_every": 0}, "config.phases.add_every"),
    ({"relations.affinity_every": -1}, "config.relations.affinity_every"),
    ({"relations.conflict_level": "layer"}, "config.relations.conflict_level: got 'layer'"),
    ({"prediction_images": -2}, "config.prediction_images"),
])
def test_bad_strategy_and_relation_fields_fail_before_anything_is_built(tmp_path, overrides,
                                                                        match):
  from mtjax.errors import UserError
  cfg = tiny_config(tmp_path / "data", **overrides)
  with pytest.raises(UserError, match=match):
    loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
