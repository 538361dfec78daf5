"""The run plan: every bad input of docs/failures.md that is a config field is one
``config.<field>: ...`` error of :func:`mtjax.train.setup.resolve`, raised before anything is
compiled; the prediction grid of the report draws every registered architecture."""

import jax
import ml_collections
import pytest

from mtjax import config as config_lib
from mtjax import models
from mtjax.errors import UserError
from mtjax.train import loop, setup, sinks
from tests.helpers import scenes, tiny_config

SEVERAL = {"seg": {"name": "shapes", "tasks": ("segmentation",)},
           "geo": {"name": "shapes", "tasks": ("depth", "normals")}}

# (case, overrides, the error's start): the rows of docs/failures.md about config fields, and
# a fixed weighting with the wrong number of weights.
CASES = [
    ("unknown task", {"tasks": ("depht",)}, "config.tasks: got 'depht'; expected task names"),
    ("task the dataset does not label", {"dataset.name": "cityscapes", "tasks": ("normals",)},
     "config.tasks: got 'normals'; expected tasks that dataset 'cityscapes' labels"),
    ("bad common model field", {"model.width": -3},
     "config.model.width: got -3; expected a positive int"),
    ("representation level without a shared encoder",
     {"model": config_lib.model_config("cross_stitch", backbone="resnet_tiny", width=8,
                                       output_stride=4, stem="small", head_hidden=8),
      "grad_level": "representation", "method": "pcgrad"}, "config.grad_level: "),
    ("unknown augmentation", {"dataset.augment": ("rotate",)}, "config.dataset.augment: "),
    ("unknown loader", {"dataset.loader": "nope"}, "config.dataset.loader: got 'nope'"),
    ("several datasets, unknown sampler", {"datasets": SEVERAL, "dataset_sampler": "greedy"},
     "config.dataset_sampler: got 'greedy'"),
    ("several datasets, a task not in config.tasks",
     {"datasets": {**SEVERAL, "seg": {"name": "shapes", "tasks": ("classification",)}}},
     "config.datasets.seg.tasks: got 'classification'"),
    ("several datasets, the grain loader", {"datasets": SEVERAL, "dataset.loader": "grain"},
     "config.dataset.loader: got 'grain'; several datasets"),
    ("mesh does not fit the devices", {"mesh.data": 4, "mesh.fsdp": 4}, "config.mesh: got "),
    ("batch not a multiple of the devices", {"batch_size": 12}, "config.batch_size: got 12"),
    ("unknown strategy", {"strategy": "nope"}, "config.strategy: got 'nope'"),
    ("a strategy with a gradient method", {"strategy": "alternating", "method": "pcgrad"},
     "config.strategy: 'alternating' needs a loss-level"),
    ("bad conflict level", {"relations.conflict_level": "layer"},
     "config.relations.conflict_level: got 'layer'"),
    ("bad prediction_images", {"prediction_images": -1}, "config.prediction_images: got -1"),
    ("double sampling with an odd batch per device", {"method": "modo", "batch_size": 24},
     "config.batch_size: got 24 on 8 device(s)"),
    ("image size the model refuses",
     {"model": config_lib.model_config("segnet_mtan", backbone="segnet", width=2),
      "dataset.image_size": (48, 40)},
     "config.dataset.image_size: SegNet-MTAN max-pools 5 times by 2"),
    ("pretrained file of another format", {"model.pretrained": "w.bin"},
     "config.model.pretrained: 'w.bin'"),
    ("baseline of a task the dataset does not label", {"baselines": {"nope": {"miou": 0.5}}},
     "config.baselines.nope: got 'nope'; expected a task of the dataset's"),
    ("fixed weighting with the wrong number of weights",
     {"method": "fixed", "weighting.weights": (1.0, 2.0)},
     "config.weighting: fixed: 'weights' has 2 entries, expected one per task (3)"),
]


def _config(data_dir, overrides):
  overrides = dict(overrides)
  cfg = tiny_config(data_dir, method=overrides.pop("method", None))
  with cfg.unlocked():
    for key, value in overrides.items():
      target = cfg
      *path, last = key.split(".")
      for part in path:
        target = target[part]
      target[last] = (ml_collections.ConfigDict(value) if isinstance(value, dict) else value)
  return cfg


@pytest.mark.parametrize("case,overrides,message", CASES, ids=[c[0] for c in CASES])
def test_bad_inputs_are_one_config_error_before_anything_compiles(tmp_path, case, overrides,
                                                                  message):
  compiled = []

  def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name", ""))
  cfg = _config(tmp_path / "data", overrides)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    with pytest.raises(UserError) as error:
      setup.resolve(cfg)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  assert str(error.value).startswith(message), (case, str(error.value))
  assert "\n" not in str(error.value)
  assert compiled == [], case
  assert not (tmp_path / "data").exists()   # no data read or built either


def test_a_baseline_of_a_task_the_run_does_not_train_is_not_an_error(tmp_path):
  """A single-task row runs under its multi-task config, whose baselines name every task."""
  cfg = _config(tmp_path / "data", {"tasks": ("segmentation",), "baselines": {
      "segmentation": {"miou": 0.5}, "depth": {"abs_err": 0.4}}})
  config_lib.validate(cfg)
  with pytest.raises(UserError, match=r"config.baselines.depth.miou: got 'miou'"):
    config_lib.validate(_config(tmp_path / "data", {"tasks": ("segmentation",), "baselines": {
        "depth": {"miou": 0.5}}}))


def test_the_plan_resolves_the_default_experiment_once(tmp_path):
  run = setup.resolve(tiny_config(tmp_path / "data"))
  assert run.periods.logs(2) and not run.periods.logs(3) and run.periods.logs(6)
  assert run.periods.evaluates(3) and not run.periods.evaluates(6)
  assert run.periods.saves(4, last=6) and run.periods.saves(5, last=5)
  assert [e.key for e in run.inputs.entries] == ["dataset"]
  assert run.step_options.batch_size == 8 and run.step_options.image_shape == (32, 32, 3)
  with pytest.raises(AttributeError):
    run.seed = 1   # frozen


# Architectures that are their own encoder name it as their backbone.
OWN_BACKBONE = {"segnet_mtan": "segnet"}
OWN_SIZE = {"segnet_mtan": 32}   # SegNet max-pools 5 times


@pytest.mark.parametrize("architecture", models.names())
def test_the_reports_prediction_grid_draws_every_architecture(tmp_path, architecture):
  """The report's path of the figures (:func:`mtjax.train.loop.prediction_shower`, with the
  trainer's ``predict``: the evaluation's outputs) for each registered architecture."""
  size = OWN_SIZE.get(architecture, 16)
  cfg = tiny_config(tmp_path / "data", prediction_images=2,
                    **{"dataset.image_size": (size, size)})
  with cfg.unlocked():
    common = {k: cfg.model[k] for k in ("output_stride", "stem", "dtype")}
    cfg.model = config_lib.model_config(architecture, **common, width=4, head_hidden=4,
                                        backbone=OWN_BACKBONE.get(architecture, "resnet_tiny"))
  run = setup.resolve(cfg)
  trainer = setup.make_trainer(None, run.experiment, run.mesh, run.step_options)
  state = trainer.init(jax.random.PRNGKey(0))
  examples = scenes(2, size=size)
  show = loop.prediction_shower(run, trainer, examples, sinks.Sinks((), None, None,
                                                                    str(tmp_path)))
  show(state, 3)
  assert (tmp_path / "predictions" / "step_3.png").stat().st_size > 0

