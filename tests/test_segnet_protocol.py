"""The SegNet-MTAN protocol config from the command line, on a NYUv2 folder of random arrays:
a few training steps with a checkpoint, and a resume that ends with the same bits; ``mtjax
eval`` of a model saved by LibMTL reports LibMTL's metrics."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/nyuv2_segnet_mtan.py"


def _random_nyuv2(root, size):
  spec = importlib.util.spec_from_file_location(
      "make_libmtl_segnet_fixture", ROOT / "tests" / "fixtures" / "make_libmtl_segnet_fixture.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.random_nyuv2(str(root), images=4, size=size)


def _mtjax(*args):
  # One CPU device (the suite's 8 forced host devices would ask for a batch of 8).
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": flags}
  return subprocess.run([sys.executable, "-m", "mtjax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_protocol_trains_from_the_command_line_and_resumes(tmp_path):
  data = tmp_path / "nyuv2"
  _random_nyuv2(data, (64, 64))
  # The protocol's config as it is (augmentation, Adam, the step schedule), at a tiny width and
  # size: 4 steps of batch 2 (two epochs of the 4 training images), the rate halved at step 2.
  args = [f"--config.dataset.data_dir={data}", "--config.dataset.image_size=(64, 64)",
          "--config.model.width=1", "--config.num_steps=4", "--config.log_every=1",
          "--config.eval_every=0", "--config.checkpoint_every=2",
          "--config.optimizer.step_size=2", "--config.prediction_images=0",
          "--config.relations.conflict=False", "--config.dataset.num_workers=0",
          "--progress_bar=false"]
  full, cut = tmp_path / "full", tmp_path / "cut"
  run = _mtjax("train", "--config", CONFIG, "--workdir", str(full), *args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["2", "4"]
  with open(full / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  # The same run stopped after its step-2 checkpoint (its later log lines are dropped on resume).
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "4")
  os.remove(cut / "results.json")
  resumed = _mtjax("train", "--config", CONFIG, "--workdir", str(cut), *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  with open(full / "results.json") as f, open(cut / "results.json") as g:
    want, got = json.load(f), json.load(g)
  assert got["step"] == want["step"] == 4
  assert got["test"] == want["test"]            # the same bits after the resume
  assert set(got["test"]["metrics"]) == {"segmentation", "depth", "normals"}
  with open(cut / "metrics.jsonl") as f:
    again = [json.loads(line) for line in f if line.strip()]

  def train_lines(lines):
    return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in lines if "loss" in r]
  assert train_lines(again) == train_lines(records)
  np.testing.assert_allclose([r["learning_rate"] for r in train_lines(records)],
                             [1e-4, 1e-4, 5e-5, 5e-5], rtol=1e-6)   # StepLR, step_size 2


def _config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "configs" /
                                                f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("pcgrad")


def test_protocol_configs_hold_the_reference_values():
  """The settings of the protocol tables (docs/protocols.md, "SegNet-MTAN")."""
  from mtjax import config as config_lib

  for name, size, tasks, batch, images in (
      ("nyuv2_segnet_mtan", (288, 384), ("segmentation", "depth", "normals"), 2, 795),
      ("cityscapes_segnet_mtan", (128, 256), ("segmentation", "depth"), 8, 2975)):
    cfg = _config(name)
    config_lib.validate(cfg)
    epoch = images // batch
    assert tuple(cfg.dataset.image_size) == size and tuple(cfg.tasks) == tasks
    assert cfg.model.architecture == "segnet_mtan" and cfg.model.backbone == "segnet"
    assert cfg.model.width == 64 and cfg.weighting.name == "pcgrad"
    assert tuple(cfg.dataset.augment) == ("scale_crop", "hflip")
    assert cfg.batch_size == batch and cfg.num_steps == 200 * epoch
    assert cfg.eval_every == epoch and cfg.log_every == epoch
    opt = cfg.optimizer
    assert (opt.name, opt.learning_rate, opt.weight_decay) == ("adam", 1e-4, 0.0)
    assert (opt.schedule, opt.step_size, opt.gamma) == ("step", 100 * epoch, 0.5)


def test_eval_of_a_libmtl_model_reports_libmtl_metrics(tmp_path):
  """``mtjax eval --config.model.pretrained=<LibMTL state dict>`` with no checkpoint in the
  workdir, on a NYUv2 folder of random arrays: the metrics LibMTL's examples/nyu/utils.py
  computed for the same weights and images (tests/fixtures/make_libmtl_segnet_fixture.py),
  within mIoU and pixel accuracy 2e-3, depth errors 0.5 %, angles 0.05°."""
  fixture = dict(np.load(ROOT / "tests" / "fixtures" / "libmtl_segnet_tiny.npz"))
  data = tmp_path / "nyuv2"
  _random_nyuv2(data, (288, 384))
  run = _mtjax("eval", "--config", CONFIG, "--workdir", str(tmp_path / "eval"),
               f"--config.model.pretrained={ROOT / 'tests' / 'fixtures'}/"
               "libmtl_segnet_tiny.safetensors",
               f"--config.model.width={int(fixture['width'])}",
               f"--config.dataset.data_dir={data}",
               f"--config.eval_batch_size={int(fixture['test_bs'])}",
               "--config.prediction_images=0", "--config.dataset.num_workers=0",
               "--progress_bar=false")
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / "eval" / "results.json") as f:
    got = json.load(f)["validation"]["metrics"]
  seg, depth, normal = (fixture[f"metric_{n}"] for n in ("segmentation", "depth", "normal"))
  assert abs(got["segmentation"]["miou"] - seg[0]) < 2e-3
  assert abs(got["segmentation"]["pixel_acc"] - seg[1]) < 2e-3
  np.testing.assert_allclose(got["depth"]["abs_err"], depth[0], rtol=5e-3)
  np.testing.assert_allclose(got["depth"]["rel_err"], depth[1], rtol=5e-3)
  assert abs(got["normals"]["mean_angle"] - normal[0]) < 0.05
  assert abs(got["normals"]["median_angle"] - normal[1]) < 0.05
  for value, threshold in zip(normal[2:], ("11_25", "22_5", "30"), strict=True):
    assert abs(got["normals"][f"within_{threshold}"] - 100 * value) < 0.05
