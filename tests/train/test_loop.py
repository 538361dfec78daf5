"""The loop: end to end on a tiny build, bitwise reproducibility, exact resume, early errors."""

import json

import jax
import numpy as np
import pytest

from mtjax import checkpoint
from mtjax.data import pipeline
from mtjax.train import loop, setup, strategies
from tests.helpers import read_log, restore_latest, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def _params(workdir):
  return restore_latest(workdir)[1]


def _log(workdir):
  return read_log(workdir)


def _assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_writes_everything_and_is_bitwise_reproducible(data_dir, tmp_path):
  cfg = tiny_config(data_dir, method="rlw")
  out = loop.train(cfg, str(tmp_path / "a"), progress=False)
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "curves.png"):
    assert (tmp_path / "a" / name).exists(), name
  assert set(out) >= {"validation", "test"}
  assert 0.0 <= out["validation"]["metrics"]["segmentation"]["miou"] <= 1.0
  records = _log(tmp_path / "a")
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
  assert [r["step"] for r in records if r["split"] == "validation"] == [3]
  assert all(np.isfinite(r["weight/depth"]) for r in records if r["split"] == "train")

  again = loop.train(cfg, str(tmp_path / "b"), progress=False)
  _assert_bitwise_equal(_params(tmp_path / "a"), _params(tmp_path / "b"))
  assert records == _log(tmp_path / "b")
  assert out["test"] == again["test"]


def test_one_compile_per_step_and_metrics_fetched_only_at_logging_steps(data_dir, tmp_path,
                                                                        monkeypatch):
  # Compilations: JAX's backend-compile event names the jitted function. Host reads of the
  # train metrics: every jax.device_get of a metrics dict, tagged with the steps run so far.
  compiled, fetched, steps_run = [], [], [0]

  def on_duration(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name", ""))

  device_get = jax.device_get

  def counting_device_get(tree):
    if isinstance(tree, dict) and "grad_norm" in tree:
      fetched.append(steps_run[0])
    return device_get(tree)

  make_trainer = setup.make_trainer

  def counting_trainer(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    def step(*a, **k):
      steps_run[0] += 1
      return trainer.step(*a, **k)
    return trainer._replace(step=step)

  monkeypatch.setattr(jax, "device_get", counting_device_get)
  monkeypatch.setattr(setup, "make_trainer", counting_trainer)
  cfg = tiny_config(data_dir, num_steps=6, log_every=3, eval_every=2, checkpoint_every=2)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    loop.train(cfg, str(tmp_path), progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  # Validation at steps 2 and 4, and the final report (validation and test): one eval compile.
  # One compile per distinct phase of the strategy (end to end: one; see test_strategies).
  assert compiled.count("jit(step)") == len(strategies.distinct_phases(
      cfg.strategy, cfg.phases, cfg.tasks, 0, cfg.num_steps)) == 1, compiled
  assert compiled.count("jit(evaluate)") == 1, compiled
  assert steps_run[0] == 6
  assert fetched == [3, 6]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(data_dir, tmp_path):
  cfg = tiny_config(data_dir, method="famo")  # a stateful method: its state must resume too
  loop.train(cfg, str(tmp_path / "full"), progress=False)
  assert loop.train(cfg, str(tmp_path / "cut"), progress=False, stop_after=3) == {}
  assert checkpoint.latest_step(str(tmp_path / "cut" / "checkpoints")) == 3
  # The one-dataset position of checkpoints written before one dataset was a mixture of one
  # (pipeline.position: epoch and batch in epoch at the top level) resumes to the same bits.
  meta = tmp_path / "cut" / "checkpoints" / "3" / "meta" / "metadata"
  saved = json.loads(meta.read_text())
  assert list(saved["data_position"]["datasets"]) == ["dataset"]
  saved["data_position"] = pipeline.position(3, 32, cfg.batch_size, cfg.seed, 1)
  meta.write_text(json.dumps(saved))
  loop.train(cfg, str(tmp_path / "cut"), progress=False)
  _assert_bitwise_equal(_params(tmp_path / "full"), _params(tmp_path / "cut"))
  assert _log(tmp_path / "full") == _log(tmp_path / "cut")


def test_eval_command_restores_and_reports(data_dir, tmp_path):
  cfg = tiny_config(data_dir)
  trained = loop.train(cfg, str(tmp_path), progress=False)
  evaluated = loop.evaluate(cfg, str(tmp_path))
  assert evaluated["test"] == trained["test"]


def test_foreign_checkpoint_is_refused_and_kept(data_dir, tmp_path):
  cfg = tiny_config(data_dir)
  loop.train(cfg, str(tmp_path), progress=False, stop_after=2)
  ckpt = tmp_path / "checkpoints"
  before = sorted(p.name for p in ckpt.iterdir())
  other = tiny_config(data_dir, **{"optimizer.learning_rate": 0.5})
  with pytest.raises(ValueError, match="different config.*optimizer.learning_rate"):
    loop.train(other, str(tmp_path), progress=False)
  assert sorted(p.name for p in ckpt.iterdir()) == before
  # Presentation fields may change: the run resumes.
  relaxed = tiny_config(data_dir, log_every=3)
  loop.train(relaxed, str(tmp_path), progress=False)
  assert checkpoint.latest_step(str(ckpt)) == cfg.num_steps


@pytest.mark.parametrize("field,value,match", [
    ("tasks", ("segmentation", "optical_flow"), r"config.tasks: got 'optical_flow'; expected task"),
    ("weighting.name", "magic", r"config.weighting.name.*'magic'.*ew"),
    ("model.backbone", "vgg16", r"config.model.backbone.*'vgg16'.*resnet18"),
    ("dataset.name", "imagenet", r"config.dataset.name.*'imagenet'.*shapes"),
    ("grad_level", "layer", r"config.grad_level.*'layer'"),
    ("task_chunk", 2, r"config.task_chunk: got 2.*no 'from_gram'"),
    ("batch_size", 12, r"config.batch_size.*12.*multiple of the number of devices \(8\)"),
    ("baselines", {"depth": {"miou": 0.5}}, r"baselines.depth.miou"),
])
def test_bad_config_fails_before_anything_is_built(data_dir, tmp_path, field, value, match):
  cfg = tiny_config(data_dir)
  with cfg.unlocked():
    target = cfg
    *path, last = field.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  with pytest.raises(ValueError, match=match):
    loop.train(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_unknown_weighting_hyperparameter(data_dir, tmp_path):
  cfg = tiny_config(data_dir, method="cagrad")
  with cfg.unlocked():
    cfg.weighting.alpha = 0.3
  with pytest.raises(ValueError, match=r"config.weighting.*unknown hyperparameter.*'alpha'.*'c'"):
    loop.train(cfg, str(tmp_path), progress=False)


def test_batch_of_the_wrong_shape(data_dir):
  cfg = tiny_config(data_dir)
  batch = {"image": np.zeros((8, 32, 32, 3)), "segmentation": np.zeros((8, 16, 16)),
           "depth": np.zeros((8, 32, 32)), "depth_valid": np.zeros((8, 32, 32), bool),
           "normals": np.zeros((8, 32, 32, 3))}
  from mtjax import tasks
  exp = setup.build(cfg)
  with pytest.raises(ValueError, match=r"batch\['segmentation'\].*\(8, 16, 16\).*\(8, 32, 32\)"):
    tasks.check_batch(exp.tasks, batch, cfg.dataset.image_size, 8)
  del batch["depth"]
  batch["segmentation"] = np.zeros((8, 32, 32))
  with pytest.raises(ValueError, match="batch: missing 'depth'"):
    tasks.check_batch(exp.tasks, batch, cfg.dataset.image_size, 8)


def test_meta_method_trains_with_its_own_step(data_dir, tmp_path):
  cfg = tiny_config(data_dir, method="auto_lambda", **{"weighting.meta_lr": 0.01})
  out = loop.train(cfg, str(tmp_path), progress=False)
  records = [r for r in _log(tmp_path) if r["split"] == "train"]
  assert all(np.isfinite(r["meta_grad/depth"]) for r in records)
  assert records[-1]["weight/depth"] != 0.1  # λ moved from its initial value
  assert np.isfinite(out["test"]["metrics"]["depth"]["abs_err"])
