"""The command line, as the README runs it (in a subprocess, on a tiny build)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.image_size=(32, 32)", "--config.dataset.split_sizes.train=16",
        "--config.dataset.split_sizes.validation=8", "--config.dataset.split_sizes.test=8",
        "--config.model.width=8", "--config.model.head_hidden=8", "--config.batch_size=8",
        "--config.eval_batch_size=8", "--config.num_steps=2", "--config.log_every=1",
        "--config.eval_every=0", "--progress_bar=false"]


def _mtjax(*args, env=None):
  return subprocess.run([sys.executable, "-m", "mtjax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_train_then_eval_with_method_hyperparameters(tmp_path):
  env = {**os.environ, "MTJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  config = "experiments/configs/shapes.py:fixed"
  workdir = str(tmp_path / "run")
  groups = ['--config.optimizer.frozen=("shared/stem",)',
            '--config.optimizer.lr_scale=(("shared", 0.5), ("depth", 2.0))']
  run = _mtjax("train", "--config", config, "--workdir", workdir,
               "--config.weighting.weights=(1.0, 0.0, 2.0)", *groups, *TINY, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| segmentation | miou |" in run.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  with open(os.path.join(workdir, "config.json")) as f:
    optimizer = json.load(f)["optimizer"]
  assert optimizer["frozen"] == ["shared/stem"]
  assert optimizer["lr_scale"] == [["shared", 0.5], ["depth", 2.0]]
  assert (first["weight/segmentation"], first["weight/depth"], first["weight/normals"]) == (
      1.0, 0.0, 2.0)
  with open(os.path.join(workdir, "results.json")) as f:
    settings = json.load(f)["runtime"]  # config.deterministic (default true) reached $XLA_FLAGS
  assert settings["deterministic"] is True
  assert "--xla_gpu_deterministic_ops=true" in settings["xla_flags"].split()
  assert settings["compilation_cache"] == env["JAX_COMPILATION_CACHE_DIR"]  # "auto": JAX's own
  again = _mtjax("eval", "--config", config, "--workdir", workdir,
                 "--config.weighting.weights=(1.0, 0.0, 2.0)", *groups, *TINY, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  other = _mtjax("train", "--config", "experiments/configs/shapes.py:pcgrad", "--workdir",
                 workdir, *TINY, env=env)
  assert other.returncode == 2 and "Traceback" not in other.stderr
  assert _error_line(other).startswith("mtjax: error: workdir ")
  assert "holds a checkpoint (step 2) of a different config" in other.stderr


@pytest.mark.parametrize("args,message", [
    ([], "usage: mtjax train --config"),
    (["fit"], "usage: mtjax train --config"),
])
def test_usage_errors(args, message):
  run = _mtjax(*args)
  assert run.returncode == 2 and message in run.stderr


def _error_line(run):
  lines = run.stderr.strip().splitlines()
  return lines[-1] if lines else ""


@pytest.mark.parametrize("case,args,message", [
    ("unknown task", ["--config.tasks=('depht',)"],
     "config.tasks: got 'depht'; expected task names from ["),
    ("unknown method after ':'", ["--config", "experiments/configs/shapes.py:nope"],
     "config.weighting.name: got 'nope' (the method after ':' in --config); expected one of "
     "['aligned_mtl', "),
    ("unknown config field", ["--config.nope=1"], "--config: no such field 'nope'"),
    ("fixed weights of the wrong length", ["--config", "experiments/configs/shapes.py:fixed",
                                           "--config.weighting.weights=(1.0, 2.0)"],
     "config.weighting: fixed: 'weights' has 2 entries, expected one per task (3)"),
    ("bad value type", ["--config.batch_size=abc"], "flag --config.batch_size=abc:"),
    ("missing config file", ["--config", "nowhere.py"],
     "--config: cannot load 'nowhere.py': [Errno 2] No such file or directory"),
    ("workdir is a file", ["--workdir", "FILE"], "FILE' is a file; expected a folder"),
    ("cache dir not a folder", ["--config.compilation_cache=FILE"],
     "config.compilation_cache: cannot use "),
    ("data dir not a folder", ["--data_dir_is_a_file"],
     "config.dataset.data_dir (else $MTJAX_DATA_DIR): cannot build or read dataset 'shapes'"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, case, args, message):
  (tmp_path / "FILE").write_text("not a folder")
  env = {**os.environ, "MTJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  if args == ["--data_dir_is_a_file"]:
    env["MTJAX_DATA_DIR"], args = str(tmp_path / "FILE" / "data"), []
  args = [a.replace("=FILE", f"={tmp_path / 'FILE' / 'cache'}") for a in args]
  base = {"--config": "experiments/configs/shapes.py", "--workdir": str(tmp_path / "w")}
  for flag in base:
    if flag in args:
      i = args.index(flag)
      value = args[i + 1]
      base[flag] = str(tmp_path / value) if value == "FILE" else value
      args = args[:i] + args[i + 2:]
  run = _mtjax("train", "--config", base["--config"], "--workdir", base["--workdir"], *args,
               *TINY, env=env)
  assert run.returncode == 2, (case, run.stderr[-3000:])
  line = _error_line(run)
  assert line.startswith("mtjax: error: ") and message in line, (case, run.stderr[-2000:])
  assert "Traceback" not in run.stderr, case
  if case == "unknown task":  # --verbose shows the traceback, then the same line
    again = _mtjax("train", "--config", base["--config"], "--workdir", base["--workdir"],
                   *args, *TINY, "--verbose", env=env)
    assert again.returncode == 2 and "Traceback" in again.stderr
    assert _error_line(again) == _error_line(run)


@pytest.mark.parametrize("case,command,message", [
    ("eval without checkpoint", ["eval", "--config", "experiments/configs/shapes.py",
                                 "--workdir", "EMPTY"], "has no checkpoint to evaluate"),
    ("workdir missing", ["train", "--config", "experiments/configs/shapes.py"],
     "--config and --workdir are required"),
    ("stray argument", ["train", "--config", "experiments/configs/shapes.py", "--workdir",
                        "EMPTY", "extra"], "unexpected arguments"),
    ("host flags without --distributed", ["train", "--config", "experiments/configs/shapes.py",
                                          "--workdir", "EMPTY", "--num_processes=2"],
     "--num_processes: only with --distributed"),
])
def test_command_errors_print_one_line_and_exit_2(tmp_path, case, command, message):
  (tmp_path / "EMPTY").mkdir()
  env = {**os.environ, "MTJAX_DATA_DIR": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"}
  command = [str(tmp_path / a) if a == "EMPTY" else a for a in command]
  run = _mtjax(*command, env=env)
  assert run.returncode == 2, (case, run.stderr[-3000:])
  line = _error_line(run)
  assert line.startswith("mtjax: error: ") and message in line, (case, run.stderr[-2000:])
  assert "Traceback" not in run.stderr, case
