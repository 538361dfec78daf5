"""Two processes on this machine as two hosts: ``mtjax train --distributed`` of 4 CPU devices
each (``jax.distributed`` over localhost), with data parallelism and with FSDP, against one
process of 8 devices; the two-process checkpoint restored by one process (``mtjax eval``)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from mtjax.train import loop
from tests.conftest import COMPILE_FAST
from tests.helpers import read_log, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"dataset.split_sizes.train": 16, "dataset.split_sizes.validation": 8,
          "dataset.split_sizes.test": 8, "num_steps": 2, "log_every": 1, "eval_every": 0,
          "checkpoint_every": 0}
TINY = ["--config.dataset.image_size=(32, 32)", "--config.model.width=8",
        "--config.model.head_hidden=8", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.prediction_images=0", "--config.relations.conflict=false",
        "--progress_bar=false", *(f"--config.{k}={v}" for k, v in FIELDS.items())]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, mesh):
  """``mtjax train`` as two processes of 4 CPU devices; the processes' stderr if one failed."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MTJAX_DATA_DIR": str(data_dir),
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {COMPILE_FAST}"}
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mtjax.cli", "train", "--config", "experiments/configs/shapes.py",
       "--workdir", str(workdir), *TINY, *(f"--config.mesh.{k}={v}" for k, v in mesh.items()),
       "--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  errors = []
  for i, proc in enumerate(procs):
    _, err = proc.communicate(timeout=600)
    if proc.returncode:
      errors.append(f"process {i} exited {proc.returncode}:\n{err[-3000:]}")
  return "\n".join(errors)


def _losses(workdir):
  return [{k: v for k, v in r.items() if k.startswith("loss")} for r in read_log(workdir)
          if r["split"] == "train"]


def _close_losses(got, want):
  assert len(got) == len(want) == FIELDS["num_steps"]
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_two_processes_train_like_one_and_one_process_evaluates_them(tmp_path):
  data_dir = tmp_path / "data"   # built by the two processes of the first run
  error = _two_processes(tmp_path / "dp", data_dir, {"data": 8, "fsdp": 1})
  assert not error, error
  cfg = tiny_config(data_dir, **FIELDS, prediction_images=0)
  loop.train(cfg, str(tmp_path / "one"), progress=False)   # this process: 8 devices
  want = _losses(tmp_path / "one")
  _close_losses(_losses(tmp_path / "dp"), want)

  error = _two_processes(tmp_path / "fsdp", data_dir, {"data": 2, "fsdp": 4})
  assert not error, error
  _close_losses(_losses(tmp_path / "fsdp"), want)
  with open(tmp_path / "fsdp" / "results.json") as f:
    two = json.load(f)
  one = loop.evaluate(cfg, str(tmp_path / "fsdp"))   # mtjax eval: 1 process, data 8
  assert one["step"] == two["step"] == FIELDS["num_steps"]
  for split in ("validation", "test"):
    for task, values in two[split]["metrics"].items():
      for metric, value in values.items():
        np.testing.assert_allclose(one[split]["metrics"][task][metric], value, rtol=1e-5,
                                   err_msg=f"{split}/{task}/{metric}")
