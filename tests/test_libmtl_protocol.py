"""The LibMTL DeepLab protocol from the command line, on a preprocessed NYUv2 folder of random
arrays: ``mtjax eval`` of a model trained by LibMTL (random weights stand in) reports LibMTL's
metrics, and the protocol config trains, checkpoints and resumes.

The model file and LibMTL's metrics of it come from tests/fixtures/make_libmtl_deeplab_fixture.py
(LibMTL's own code); the protocol config is shrunk only in size (width 2, 8-channel heads,
24×32 images).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from mtjax import checkpoint
from mtjax.data import sources
from mtjax.train import loop
from tests.helpers import _config_module, _override, read_log

ROOT = pathlib.Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "libmtl_deeplab"
CONFIG = "experiments/configs/nyuv2.py"
SMALL = {"dataset.image_size": (24, 32), "model.width": 2, "model.head_hidden": 8,
         "eval_batch_size": 8, "prediction_images": 0, "relations.conflict": False}


def _flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _mtjax(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mtjax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def _nyu_folder(root, ref, train_size):
  """The fixture's 3 val/ images, and ``train_size`` train/ images of random arrays."""
  val = [{"image": ref["val_image"][i], "label": ref["val_label"][i],
          "depth": ref["val_depth"][i], "normal": ref["val_normal"][i]} for i in range(3)]
  sources.write_preprocessed(str(root), "val", val)
  rng = np.random.default_rng(0)
  train = [{"image": rng.uniform(0, 1, (24, 32, 3)),
            "label": rng.integers(-1, 13, (24, 32)).astype(np.float64),
            "depth": rng.uniform(0.5, 5, (24, 32, 1)),
            "normal": val[i % 3]["normal"]} for i in range(train_size)]
  sources.write_preprocessed(str(root), "train", train)


def test_mtjax_eval_of_a_libmtl_model_reports_libmtls_metrics(tmp_path):
  ref = dict(np.load(str(FIXTURE) + ".npz"))
  _nyu_folder(tmp_path / "nyuv2", ref, train_size=8)
  workdir = tmp_path / "eval"
  run = _mtjax("eval", "--config", CONFIG, "--workdir", str(workdir),
               f"--config.model.pretrained={FIXTURE}.safetensors",
               f"--config.dataset.data_dir={tmp_path / 'nyuv2'}", "--progress_bar=false",
               *_flags(SMALL))
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = json.loads((workdir / "results.json").read_text())["validation"]["metrics"]
  miou, pixel_acc = ref["metric_segmentation"]
  assert abs(metrics["segmentation"]["miou"] - miou) < 2e-3
  assert abs(metrics["segmentation"]["pixel_acc"] - pixel_acc) < 2e-3
  abs_err, rel_err = ref["metric_depth"]
  assert abs(metrics["depth"]["abs_err"] / abs_err - 1) < 5e-3
  assert abs(metrics["depth"]["rel_err"] / rel_err - 1) < 5e-3
  assert abs(metrics["normals"]["mean_angle"] - ref["metric_normal"][0]) < 0.05
  # A file of another model: one line naming the tensors, exit 2.
  other = _mtjax("eval", "--config", CONFIG, "--workdir", str(tmp_path / "other"),
                 f"--config.model.pretrained={FIXTURE}.safetensors",
                 f"--config.dataset.data_dir={tmp_path / 'nyuv2'}", "--progress_bar=false",
                 *_flags({**SMALL, "model.head_hidden": 4}))
  assert other.returncode == 2 and "Traceback" not in other.stderr
  line = [s for s in other.stderr.splitlines() if s.startswith("mtjax: error:")]
  assert line and "mismatched shapes" in line[0] and "decoders.depth.0.project.1.bias" in line[0]


def test_protocol_config_trains_checkpoints_and_resumes_from_the_command_line(tmp_path):
  """Step 1 in this process, then ``mtjax train`` resumes from its checkpoint to step 2."""
  ref = dict(np.load(str(FIXTURE) + ".npz"))
  _nyu_folder(tmp_path / "nyuv2", ref, train_size=17)   # 2 batches of 8, one image dropped
  # The protocol's model shrunk further for a training step's compile: ResNet-tiny's trunk
  # (ImageNet stem, output stride 8: its last stage dilated), DeepLab heads of 4 channels.
  small = {**SMALL, "model.backbone": "resnet_tiny", "model.width": 4, "model.head_hidden": 4,
           "dataset.data_dir": str(tmp_path / "nyuv2"), "batch_size": 8,
           "num_steps": 2, "log_every": 1, "eval_every": 0, "checkpoint_every": 1,
           "optimizer.step_size": 1}
  cfg = _override(_config_module("nyuv2").get_config(), small)
  workdir = tmp_path / "run"
  assert loop.train(cfg, str(workdir), progress=False, stop_after=1) == {}
  assert checkpoint.latest_step(str(workdir / "checkpoints")) == 1
  run = _mtjax("train", "--config", CONFIG, "--workdir", str(workdir), "--progress_bar=false",
               *_flags(small))
  assert run.returncode == 0, run.stderr[-3000:]
  assert checkpoint.latest_step(str(workdir / "checkpoints")) == 2
  steps = [r["step"] for r in read_log(workdir) if "loss/segmentation" in r]
  assert steps == [1, 2]
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2
  assert np.isfinite(results["validation"]["metrics"]["segmentation"]["miou"])
