"""Two processes on this machine as two "hosts": ``mtjax train --distributed`` end to end.

    PYTHONPATH=. nice -n 10 python benchmarks/multihost_cpu.py \
        --out benchmarks/results/multihost_cpu

1. a reference: ``mtjax train`` in one process with 8 CPU devices (the default mesh, data 8);
2. the same experiment as two processes of 4 CPU devices each (``jax.distributed`` over
   localhost, CPU collectives over gloo), ``--config.mesh.data=2 --config.mesh.fsdp=4``: each
   process feeds its half of every batch, parameters and optimizer state split 4 ways,
   checkpoints written by both processes (orbax), files by process 0;
3. ``mtjax eval`` in one process with 8 devices on the two-process workdir: its sharded
   checkpoint restored onto another mesh.

It checks that the training losses of 2. match 1. to float32 noise and that 3. reproduces the
validation metrics of 2., and writes the figures (JSON and markdown). A check of the multi-host
path on one machine, not a speed figure. The tiny experiment of ``tests/test_cli.py``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.dataset.image_size=(32, 32)", "--config.dataset.split_sizes.train=32",
        "--config.dataset.split_sizes.validation=16", "--config.dataset.split_sizes.test=16",
        "--config.model.width=8", "--config.model.head_hidden=8", "--config.batch_size=16",
        "--config.eval_batch_size=16", "--config.num_steps=6", "--config.log_every=1",
        "--config.eval_every=0", "--config.checkpoint_every=3", "--progress_bar=false"]


def _env(devices: int, data_dir: str) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "MTJAX_DATA_DIR": data_dir,
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _cli(*args):
  return [sys.executable, "-m", "mtjax.cli", *args]


def _losses(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k.startswith("loss")}
            for line in f if line.strip()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _check(run, what):
  if run.returncode != 0:
    raise SystemExit(f"{what} failed ({run.returncode}):\n{run.stderr[-4000:]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/configs/shapes.py:pcgrad")
  p.add_argument("--out", default=None, help="PREFIX: writes PREFIX.json and PREFIX.md")
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="mtjax_multihost_")
  data_dir = os.path.join(tmp, "data")
  load_before = [round(x, 2) for x in os.getloadavg()]
  times = {}

  start = time.perf_counter()  # 1. one process, 8 devices (also builds the dataset once)
  ref_dir = os.path.join(tmp, "one")
  run = subprocess.run(_cli("train", "--config", args.config, "--workdir", ref_dir, *TINY),
                       cwd=ROOT, env=_env(8, data_dir), capture_output=True, text=True,
                       timeout=1800)
  _check(run, "the one-process run")
  times["one process, 8 devices"] = time.perf_counter() - start

  start = time.perf_counter()  # 2. two processes of 4 devices, mesh data 2 x fsdp 4
  multi_dir = os.path.join(tmp, "two")
  port = _free_port()
  procs = [subprocess.Popen(
      _cli("train", "--config", args.config, "--workdir", multi_dir, *TINY,
           "--config.mesh.data=2", "--config.mesh.fsdp=4", "--distributed",
           f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(4, data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [proc.communicate(timeout=1800) for proc in procs]
  for i, (proc, (_, err)) in enumerate(zip(procs, outs, strict=True)):
    if proc.returncode != 0:
      raise SystemExit(f"process {i} of the two-process run failed:\n{err[-4000:]}")
  times["two processes x 4 devices, fsdp 4"] = time.perf_counter() - start

  start = time.perf_counter()  # 3. its sharded checkpoint, evaluated by one process
  with open(os.path.join(multi_dir, "results.json")) as f:
    multi_results = json.load(f)
  run = subprocess.run(_cli("eval", "--config", args.config, "--workdir", multi_dir, *TINY),
                       cwd=ROOT, env=_env(8, data_dir), capture_output=True, text=True,
                       timeout=1800)
  _check(run, "mtjax eval of the two-process workdir")
  times["eval, one process"] = time.perf_counter() - start
  with open(os.path.join(multi_dir, "results.json")) as f:
    eval_results = json.load(f)

  ref, multi = _losses(ref_dir), _losses(multi_dir)
  assert len(ref) == len(multi) == 6, (len(ref), len(multi))
  loss_diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
                  for a, b in zip(ref, multi, strict=True) for k in a)
  metrics_multi = multi_results["validation"]["metrics"]
  metrics_eval = eval_results["validation"]["metrics"]
  eval_diff = max(abs(metrics_multi[t][m] - metrics_eval[t][m])
                  / max(abs(metrics_multi[t][m]), 1e-12)
                  for t in metrics_multi for m in metrics_multi[t])
  ok = loss_diff < 1e-3 and eval_diff < 1e-4
  result = {"config": args.config, "steps": 6, "loss_max_rel_diff": loss_diff,
            "eval_max_rel_diff": eval_diff, "ok": ok, "seconds": times,
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  table = "\n".join([
      "# Two processes as two hosts (`mtjax train --distributed`, CPU, gloo)", "",
      f"- config {args.config}, the tiny experiment of tests/test_cli.py, 6 steps, batch 16",
      f"- load average before {load_before}, after {result['load_after']}; {result['date']}",
      "", "| check | max relative difference |", "|---|---|",
      f"| training losses, 2 processes × 4 devices (data 2 × fsdp 4) vs 1 process × 8 "
      f"(data 8), every step | {loss_diff:.1e} |",
      f"| validation metrics: `mtjax eval` (1 process, 8 devices) of the 2-process "
      f"checkpoint vs the 2-process run's own | {eval_diff:.1e} |", "",
      "Seconds (compilation included; a shared machine): "
      + ", ".join(f"{k}: {v:.0f}" for k, v in times.items()), ""])
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
    with open(args.out + ".md", "w") as f:
      f.write(table)
  if not ok:
    raise SystemExit("the two-process run does not match the one-process run")
  return result


if __name__ == "__main__":
  main()
