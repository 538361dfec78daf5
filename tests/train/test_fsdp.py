"""Parameter sharding (``config.mesh``, data x fsdp) on the 8 CPU devices of tests/conftest.py:
the same trajectory as one device, leaves really split, sharded checkpoints, early errors."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtjax import checkpoint, weighting
from mtjax.data import pipeline
from mtjax.errors import UserError
from mtjax.train import loop
from mtjax.train import step as step_lib
from mtjax.train.trainer import make_trainer
from tests.helpers import scenes, tiny_config, tiny_setup

TASKS = ("segmentation", "depth")
BATCH, SIZE, STEPS = 8, 16, 3
# ew: loss level; db_mtl: parameter level, with a parameter-shaped weighting state (T, *shape).
METHODS = ("ew", "db_mtl")
MESHES = {"one": None, "2x4": {"data": 2, "fsdp": 4}, "1x8": {"data": 1, "fsdp": 8}}
# One compile each: both methods on one device, EW on 2x4, DB-MTL on 1x8.
RUNS = [("ew", "one"), ("db_mtl", "one"), ("ew", "2x4"), ("db_mtl", "1x8")]


def _trainer(method, mesh_name):
  model, tasks, opt = tiny_setup(TASKS)
  mesh = (step_lib.make_mesh(jax.devices()[:1]) if mesh_name == "one"
          else step_lib.make_mesh(shape=MESHES[mesh_name]))
  trainer = make_trainer(model, tasks, weighting.get(method), opt, image_shape=(SIZE, SIZE, 3),
                         batch_size=BATCH, mesh=mesh)
  return trainer, mesh


@pytest.fixture(scope="module")
def runs():
  """``{(method, mesh): (trainer, mesh, final state, metrics per step)}``: the final state is
  left on its devices (laid out by the mesh)."""
  out = {}
  for method, mesh_name in RUNS:
    trainer, mesh = _trainer(method, mesh_name)
    state, metrics = trainer.init(jax.random.PRNGKey(0)), []
    for i in range(STEPS):
      state, m = trainer.step(state, step_lib.shard_batch(scenes(BATCH, size=SIZE, seed=i), mesh))
      metrics.append(jax.device_get(m))
    out[method, mesh_name] = (trainer, mesh, state, metrics)
  return out


def _close(a, b, rtol=2e-4, atol=2e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("method,mesh", [r for r in RUNS if r[1] != "one"])
def test_fsdp_matches_one_device(runs, method, mesh):
  _, _, state, metrics = runs[method, mesh]
  _, _, ref, ref_metrics = runs[method, "one"]
  state, ref = jax.device_get((state, ref))
  assert int(state.step) == int(ref.step) == STEPS
  _close(state.params, ref.params)
  _close(state.opt_state, ref.opt_state)
  _close(state.batch_stats, ref.batch_stats)
  _close(state.weighting_state, ref.weighting_state)
  for got, want in zip(metrics, ref_metrics, strict=True):
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-6, err_msg=name)


def test_parameter_shaped_leaves_are_split_on_fsdp(runs):
  state = runs["db_mtl", "1x8"][2]
  params = jax.tree_util.tree_leaves(state.params)
  specs = [x.sharding.spec for x in params]
  assert sum("fsdp" in tuple(s) for s in specs) >= len(params) // 2, specs
  for x in params:  # the rule: the largest axis divisible by 8 (the last of equal ones)
    divisible = [i for i, n in enumerate(x.shape) if n % 8 == 0]
    if divisible:
      axis = max(divisible, key=lambda i: (x.shape[i], i))
      assert tuple(x.sharding.spec) == tuple("fsdp" if i == axis else None
                                             for i in range(x.ndim)), (x.shape, x.sharding)
      assert x.addressable_shards[0].data.shape[axis] == x.shape[axis] // 8
    else:
      assert x.sharding.spec == P()
  # SGD momentum (parameter-shaped) follows its parameter; db_mtl's (T, *shape) EMA too.
  momentum = jax.tree_util.tree_leaves(state.opt_state)
  assert [m.sharding.spec for m in momentum if m.ndim] == specs
  ema = jax.tree_util.tree_leaves(state.weighting_state.grad_ema)
  assert any("fsdp" in tuple(e.sharding.spec) for e in ema)
  for e in ema:
    assert tuple(e.sharding.spec)[:1] in ((), (None,))  # the task axis is never split
  assert state.step.sharding.spec == P() and state.key.sharding.spec == P()


def test_sharded_checkpoint_resumes_on_any_mesh(runs, tmp_path):
  trainer, mesh, live, _ = runs["ew", "2x4"]
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, live, {"note": "fsdp"})
  mngr.close()
  # Back onto the 2x4 mesh: read straight into the sharded layout, equal to what was saved.
  restored, meta, step = checkpoint.restore_newest(str(tmp_path),
                                                   trainer.init(jax.random.PRNGKey(1)))
  assert step == STEPS and meta == {"note": "fsdp"}
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(live),
                       strict=True):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # ... and onto one device: the same values, replicated.
  one_trainer, one_mesh = runs["ew", "one"][:2]
  on_one, _, _ = checkpoint.restore_newest(str(tmp_path), one_trainer.init(jax.random.PRNGKey(1)))
  assert all(x.sharding.spec == P() for x in jax.tree_util.tree_leaves(on_one.params))
  _close(jax.device_get(on_one), jax.device_get(live), rtol=0, atol=0)
  # The next step from the restored state is the uninterrupted run's next step, bitwise; and
  # on one device the same to float32 noise.
  batch = scenes(BATCH, size=SIZE, seed=STEPS)
  resumed, m = trainer.step(restored, step_lib.shard_batch(batch, mesh))
  on_one, m1 = one_trainer.step(on_one, step_lib.shard_batch(batch, one_mesh))
  uninterrupted, m0 = trainer.step(live, step_lib.shard_batch(batch, mesh))
  _close(jax.device_get(resumed), jax.device_get(uninterrupted), rtol=0, atol=0)
  assert jax.device_get(m) == jax.device_get(m0)
  _close(jax.device_get(resumed).params, jax.device_get(on_one).params)
  assert int(resumed.step) == STEPS + 1
  # Evaluation on the sharded state: the same sums as on one device.
  sums, _ = trainer.evaluate(resumed, step_lib.shard_batch(batch, mesh))
  one_sums, _ = one_trainer.evaluate(on_one, step_lib.shard_batch(batch, one_mesh))
  _close(jax.device_get(sums), jax.device_get(one_sums))


def test_mesh_shapes_and_errors():
  assert step_lib.mesh_shape(None, 8) == {"data": 8, "fsdp": 1}
  assert step_lib.mesh_shape({"data": -1, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4}
  assert step_lib.mesh_shape({"fsdp": 8}, 8) == {"data": 1, "fsdp": 8}
  for shape, match in [({"data": 3, "fsdp": 2}, r"mesh: .*data x fsdp = 6.*8 devices"),
                       ({"data": -1, "fsdp": 3}, r"mesh: .*3 does not divide the 8 devices"),
                       ({"data": -1, "fsdp": -1}, r"mesh: .*at most one of them -1"),
                       ({"data": 0, "fsdp": 8}, r"mesh: .*positive ints"),
                       ({"model": 2}, r"mesh: got axes \['model'\]")]:
    with pytest.raises(ValueError, match=match):
      step_lib.mesh_shape(shape, 8)
  assert step_lib.fsdp_spec((3, 3, 8, 16), 4) == P(None, None, None, "fsdp")
  assert step_lib.fsdp_spec((16, 8), 4) == P("fsdp", None)
  assert step_lib.fsdp_spec((8, 8), 4) == P(None, "fsdp")
  assert step_lib.fsdp_spec((6, 3), 4) == P()
  assert step_lib.fsdp_spec((16,), 1) == P()


@pytest.mark.parametrize("overrides,match", [
    ({"mesh": {"data": 4, "fsdp": 4}}, r"config\.mesh: .*data x fsdp = 16.*8 devices"),
    ({"mesh": {"data": -1, "fsdp": 4}, "batch_size": 12},
     r"config\.batch_size.*12.*multiple of the number of devices \(8\)"),
])
def test_bad_mesh_config_fails_before_compiling(tmp_path, overrides, match):
  cfg = tiny_config(tmp_path / "tfds")
  cfg.mesh.update(overrides.pop("mesh"))
  for key, value in overrides.items():
    cfg[key] = value
  with pytest.raises(UserError, match=match):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_process_slice_reads_each_process_rows():
  batch = {"image": np.arange(8 * 2).reshape(8, 2), "mask": np.arange(8.0)}
  assert pipeline.process_slice(batch, 0, 1) is batch
  slices = [pipeline.process_slice(batch, p, 4) for p in range(4)]
  for key in batch:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), batch[key])
  np.testing.assert_array_equal(slices[2]["mask"], [4.0, 5.0])
  with pytest.raises(ValueError, match="batch_size: got 8, not a multiple of the 3 processes"):
    pipeline.process_slice(batch, 0, 3)
  with pytest.raises(ValueError, match="process_index: got 4"):
    pipeline.process_slice(batch, 4, 4)
