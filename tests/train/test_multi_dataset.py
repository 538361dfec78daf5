"""Several datasets in one run (``config.datasets``): a masked task trains nothing, each task is
evaluated where it is labelled, the sampler drives the steps, resume is bitwise, errors name
the field. The embedded dataset split into two "datasets" with different task subsets."""

import jax
import ml_collections
import numpy as np
import pytest

from mtjax import checkpoint, weighting
from mtjax import config as config_lib
from mtjax.data import mixing
from mtjax.models import labels
from mtjax.train import loop
from mtjax.train import step as step_lib
from tests.helpers import read_log, restore_latest, scenes, tiny_config, tiny_setup, tiny_trainer

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
  cfg.dataset_sampler = "proportional"
  return cfg


def test_a_masked_task_gets_no_gradient_and_is_measured_only_where_labelled():
  trainer, state, mesh = tiny_trainer(weighting.get("ew"), task_names=TASKS)
  model, tasks, _ = tiny_setup(TASKS)
  specs = {n: t.label_spec((32, 32)) for n, t in tasks.items()}
  raw = scenes(16)
  seg = mixing.complete_labels({k: raw[k][:8] for k in ("image", "segmentation")},
                               ("segmentation",), specs)
  geo = mixing.complete_labels({k: raw[k][8:] for k in ("image", "depth", "depth_valid")},
                               ("depth",), specs)
  assert set(seg) == set(geo) and not seg["depth"].any() and (seg["depth_mask"] == 0).all()

  new, metrics = trainer.step(state, step_lib.shard_batch(seg, mesh))
  assert float(metrics["loss/depth"]) == 0.0 < float(metrics["loss/segmentation"])
  before, after = (labels.split(model, jax.device_get(s.params)) for s in (state, new))
  for a, b in zip(jax.tree_util.tree_leaves(before["depth"]),
                  jax.tree_util.tree_leaves(after["depth"]), strict=True):
    np.testing.assert_array_equal(a, b)   # zero gradient: SGD leaves the head bitwise as it was
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(before["segmentation"]),
      jax.tree_util.tree_leaves(after["segmentation"]), strict=True))

  # Evaluation over both datasets: each task's metrics are those of the dataset labelling it.
  both = loop.evaluate_split(trainer.evaluate, new, [seg, geo], tasks, 8, mesh)
  assert both["segmentation"] == loop.evaluate_split(trainer.evaluate, new, seg, tasks, 8,
                                                     mesh)["segmentation"]
  assert both["depth"] == loop.evaluate_split(trainer.evaluate, new, geo, tasks, 8,
                                              mesh)["depth"]


def test_resume_is_bitwise_and_the_sampler_drives_the_steps(data_dir, tmp_path):
  cfg = _config(data_dir)
  full = loop.train(cfg, str(tmp_path / "full"), progress=False)
  assert loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_after=3) == {}
  meta = checkpoint.read_metadata(str(tmp_path / "cut" / "checkpoints"), 3)["data_position"]
  cut = loop.train(cfg, str(tmp_path / "cut"), progress=False)
  for a, b in zip(jax.tree_util.tree_leaves(restore_latest(tmp_path / "full")[1]),
                  jax.tree_util.tree_leaves(restore_latest(tmp_path / "cut")[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  log = read_log(tmp_path / "full")
  assert log == read_log(tmp_path / "cut") and full["test"] == cut["test"]
  assert set(full["test"]["metrics"]) == set(TASKS)

  # Step s trained on the dataset the (seed, step) schedule drew: its other task's loss is 0.
  schedule = mixing.dataset_schedule([32, 16], "proportional", seed=cfg.seed,
                                     stop=cfg.num_steps, num_steps=cfg.num_steps)
  train = [r for r in log if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, cfg.num_steps + 1))
  for k, r in zip(schedule, train, strict=True):
    assert (r["loss/depth"] == 0.0) == (k == 0) and (r["loss/segmentation"] == 0.0) == (k == 1)
  # Every dataset's position is in the checkpoint.
  assert meta["datasets"]["seg"]["draws"] == int(np.sum(schedule[:3] == 0))
  assert meta["datasets"]["geo"]["draws"] == int(np.sum(schedule[:3] == 1))
  assert meta["datasets"]["geo"]["num_examples"] == 16 and meta["sampler"] == "proportional"


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "dataset_sampler", "greedy"),
     r"config.dataset_sampler: got 'greedy'; expected one of \['uniform'"),
    (lambda c: c.datasets.geo.update({"tasks": ("normals",)}),
     r"config.datasets.geo.tasks: got 'normals'; expected tasks of config.tasks"),
    (lambda c: c.datasets.geo.update({"tasks": ()}),
     r"config.datasets.geo.tasks: got \(\); expected a non-empty tuple"),
    (lambda c: c.datasets.geo.update({"name": "mnist"}),
     r"config.datasets.geo.name: unknown dataset 'mnist'"),
    (lambda c: c.datasets.seg.update({"tasks": ("depth",)}),
     r"config.datasets: got \['segmentation'\]; expected every task of config.tasks labelled"),
    (lambda c: c.datasets.geo.update({"image_size": (16, 16)}),
     r"config.datasets.geo: got \['image_size'\]; expected fields from"),
    (lambda c: c.datasets.geo.update({"name": "cityscapes", "tasks": ("segmentation",)}),
     r"config.datasets.geo.tasks: task 'segmentation' has options \{'num_classes': 7\}"),
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
