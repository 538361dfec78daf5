"""Several datasets in one run (``config.datasets``): a masked task trains nothing, each task is
evaluated where it is labelled, the sampler drives the steps, resume is bitwise, errors name
the field. The embedded dataset split into two "datasets" with different task subsets."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtjax import config as config_lib
from mtjax.data import mixing
from mtjax.models import labels
from mtjax.train import loop, setup
from mtjax.train import step as step_lib
from tests.helpers import read_log, scenes, tiny_config, tiny_setup, tiny_tasks

TASKS = ("segmentation", "depth")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _config(data_dir, **overrides):
  cfg = tiny_config(data_dir, tasks=TASKS, log_every=1, **overrides)
  cfg.datasets = ml_collections.ConfigDict({
      "seg": {"name": "shapes", "tasks": ("segmentation",)},   # 32 training scenes
      "geo": {"name": "shapes", "tasks": ("depth",),
              "split_sizes": {"train": 16, "validation": 8, "test": 8}}})
  cfg.dataset_sampler = "uniform"
  return cfg


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def test_each_task_is_measured_on_the_datasets_that_label_it():
  tasks = tiny_tasks(TASKS)
  specs = {n: t.label_spec((32, 32)) for n, t in tasks.items()}
  raw = scenes(12)
  seg = mixing.complete_labels({k: raw[k][:4] for k in ("image", "segmentation")},
                               ("segmentation",), specs)
  geo = mixing.complete_labels({k: raw[k][4:] for k in ("image", "depth", "depth_valid")},
                               ("depth",), specs)
  assert set(seg) == set(geo) and not seg["depth"].any() and (seg["depth_mask"] == 0).all()

  def evaluate(state, batch):   # a fixed prediction: metric sums of what each batch labels
    del state
    outputs = {"segmentation": jnp.ones((8, 32, 32, 5)).at[..., 1].set(2.0),
               "depth": jnp.full((8, 32, 32, 1), 3.0)}
    return {n: t.metrics_fn(outputs[n], batch) for n, t in tasks.items()}, {}
  mesh = step_lib.make_mesh()
  both = loop.evaluate_split(evaluate, None, [seg, geo], tasks, 8, mesh)
  alone = {"segmentation": loop.evaluate_split(evaluate, None, seg, tasks, 8, mesh),
           "depth": loop.evaluate_split(evaluate, None, geo, tasks, 8, mesh)}
  for name in TASKS:
    assert both[name] == alone[name][name]
  assert 0 < both["depth"]["abs_err"]


def test_masked_steps_resume_bitwise_and_the_sampler_drives_the_steps(data_dir, tmp_path,
                                                                      monkeypatch):
  # One trainer for the runs of this test (the same config): one compilation, not three.
  made = {}
  make = setup.make_trainer
  monkeypatch.setattr(setup, "make_trainer",
                      lambda *a, **k: made.setdefault("trainer", make(*a, **k)))
  cfg = _config(data_dir, checkpoint_every=1, keep_checkpoints=10,
                **{"optimizer.name": "sgd", "optimizer.momentum": 0.0,
                   "optimizer.schedule": "constant"})
  full = str(tmp_path / "full")
  results = loop.train(cfg, full, progress=False)
  assert set(results["test"]["metrics"]) == set(TASKS)

  # Step s trained on the dataset the (seed, step) schedule drew (datasets in key order):
  # its other task's loss is 0 and that task's head gets no update (plain SGD: no gradient).
  order = list(config_lib.dataset_entries(cfg))
  assert order == sorted(cfg.datasets)
  sizes = {"seg": 32, "geo": 16}
  schedule = mixing.dataset_schedule([sizes[k] for k in order], "uniform", seed=cfg.seed,
                                     stop=cfg.num_steps, num_steps=cfg.num_steps)
  assert len(set(schedule.tolist())) == 2
  model, _, _ = tiny_setup(TASKS)
  log = [r for r in read_log(full) if r["split"] == "train"]
  assert [r["step"] for r in log] == list(range(1, cfg.num_steps + 1))
  heads = [labels.split(model, _state(full, s)["params"]) for s in range(1, cfg.num_steps + 1)]
  for s, (k, r) in enumerate(zip(schedule, log, strict=True)):
    masked = "depth" if order[k] == "seg" else "segmentation"
    labelled = ({*TASKS} - {masked}).pop()
    assert r[f"loss/{masked}"] == 0.0 < r[f"loss/{labelled}"]
    if s:
      same = [np.array_equal(a, b) for a, b in zip(
          jax.tree_util.tree_leaves(heads[s - 1][masked]),
          jax.tree_util.tree_leaves(heads[s][masked]), strict=True)]
      assert all(same), (s, masked)
      assert not all(np.array_equal(a, b) for a, b in zip(
          jax.tree_util.tree_leaves(heads[s - 1][labelled]),
          jax.tree_util.tree_leaves(heads[s][labelled]), strict=True))

  # Every dataset's position is in the checkpoint; a run resumed at step 3 ends bitwise equal.
  meta = loop.checkpoint.read_metadata(os.path.join(full, "checkpoints"), 3)["data_position"]
  for k, key in enumerate(order):
    assert meta["datasets"][key]["draws"] == int(np.sum(schedule[:3] == k))
    assert meta["datasets"][key]["num_examples"] == sizes[key]
  cut = str(tmp_path / "cut")
  shutil.copytree(full, cut)
  for s in range(4, cfg.num_steps + 1):
    shutil.rmtree(os.path.join(cut, "checkpoints", str(s)))
  resumed = loop.train(cfg, cut, progress=False)
  for a, b in zip(jax.tree_util.tree_leaves(_state(full, cfg.num_steps)),
                  jax.tree_util.tree_leaves(_state(cut, cfg.num_steps)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert read_log(full) == read_log(cut) and resumed["test"] == results["test"]


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "dataset_sampler", "greedy"),
     r"config.dataset_sampler: got 'greedy'; expected one of \['uniform'"),
    (lambda c: c.datasets.geo.update({"tasks": ("normals",)}),
     r"config.datasets.geo.tasks: got 'normals'; expected tasks of config.tasks"),
    (lambda c: c.datasets.geo.update({"tasks": ()}),
     r"config.datasets.geo.tasks: got \(\); expected a non-empty tuple"),
    (lambda c: c.datasets.geo.update({"name": "mnist"}),
     r"config.datasets.geo.name: unknown dataset 'mnist'"),
    (lambda c: c.datasets.geo.update({"name": "coco/2017"}),
     r"config.datasets.geo.name: unknown dataset 'coco/2017' \(COCO's TFDS builder .* needs "
     r"TensorFlow even to read"),
    (lambda c: c.datasets.seg.update({"tasks": ("depth",)}),
     r"config.datasets: got \['segmentation'\]; expected every task of config.tasks labelled"),
    (lambda c: c.datasets.geo.update({"image_size": (16, 16)}),
     r"config.datasets.geo: got \['image_size'\]; expected fields from"),
    (lambda c: c.datasets.geo.update({"name": "cityscapes", "tasks": ("segmentation",)}),
     r"config.datasets.seg.tasks: task 'segmentation' has options \{'num_classes': 5\} in "
     r"dataset 'shapes' but \{'num_classes': 7\} in config.datasets.geo"),
])
def test_bad_datasets_fields_are_named_before_anything_is_built(data_dir, change, match):
  cfg = _config(data_dir)
  change(cfg)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


def test_several_datasets_refuse_the_grain_loader(data_dir, tmp_path):
  cfg = _config(data_dir, **{"dataset.loader": "grain"})
  with pytest.raises(ValueError, match=r"config.dataset.loader: got 'grain'; several datasets"):
    loop.train(cfg, str(tmp_path), progress=False)
