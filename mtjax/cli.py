"""``mtjax train|eval --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...] [--verbose]``;
``mtjax group --workdir RUN --groups K``: the best split of a finished run's tasks into K groups
by its averaged inter-task affinity (TAG; :func:`mtjax.relations.group_tasks`).

A user error (a bad flag or config field, the data dir, the workdir, a checkpoint of another
config) prints one line, ``mtjax: error: <message>``, and exits with 2; a run that cannot go on
(it diverged, the disk is full: :class:`mtjax.errors.RunError`) prints one line and exits with
1. ``--verbose`` adds the traceback. Other exceptions are bugs and keep their traceback.
"""

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from mtjax import cli_help
from mtjax.errors import RunError, UserError

COMMANDS = ("train", "eval", "group")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An ml_collections config file, e.g. experiments/configs/shapes.py[:METHOD].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_PROGRESS = flags.DEFINE_bool("progress_bar", True, "Show a progress bar.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, also show its Python traceback.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Several hosts: call jax.distributed.initialize before anything "
    "touches the devices (on TPU pods, SLURM and Open MPI it finds its peers itself).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0 (else detected).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: the number of processes (else detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed: this process's index, 0..num_processes-1 "
    "(else detected).")
_GROUPS = flags.DEFINE_integer("groups", None, "mtjax group: the number of task groups.")


def _fail(message, code: int, verbose: bool):
  if verbose:
    traceback.print_exc()
  print(f"mtjax: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def _user_message(error: BaseException) -> str:
  """What to tell the user about an error raised while the flags (and the config file, which
  they load) were parsed: the innermost UserError if any, else the flag's error without the
  traceback that ml_collections folds into it."""
  chain, cause = [], error
  while cause is not None:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  users = [c for c in chain if isinstance(c, UserError)]
  if users:
    return str(users[-1])
  if isinstance(error, (AttributeError, KeyError)):  # --config.FIELD=... of no field
    field = str(chain[-1]).strip('"')
    return f"--config: no such field {field} (an override on the command line)"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and "Traceback" in lines[1]:
    return f"{lines[0]} {lines[-1]}"  # the flag and the exception, not the traceback
  return lines[0] if lines else type(error).__name__


def _load_error(error: OSError, path: str) -> str:
  """A config file that could not be loaded: the file and the innermost reason."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f"--config: cannot load {path!r}: {lines[-1] if lines else type(error).__name__}"


def _parse_flags(argv):
  verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
  try:
    return flags.FLAGS(argv)
  except OSError as e:  # the config file could not be loaded (an override touched it)
    pairs = zip(argv, [*argv[1:], ""], strict=True)
    path = next((a.split("=", 1)[1] if "=" in a else b for a, b in pairs
                 if a == "--config" or a.startswith("--config=")), "")
    _fail(_load_error(e, path), 2, verbose)
  except Exception as e:  # noqa: BLE001 -- a flag, or the config file it loads: the user's input
    _fail(_user_message(e), 2, verbose)


def _config():
  """The config; a config file that could not be loaded is reported as a user error."""
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load raises on first use
    return config
  except OSError as e:
    _fail(_load_error(e, flags.FLAGS["config"].config_filename), 2, _VERBOSE.value)


def _apply_runtime(config):
  """XLA's deterministic GPU execution (``config.deterministic``, default true) and the
  persistent compilation cache (``config.compilation_cache``, default ``"auto"``), before
  anything starts JAX's backend (:mod:`mtjax.runtime`)."""
  from mtjax import runtime

  deterministic = config.get("deterministic", True)
  if not isinstance(deterministic, bool):
    _fail(f"config.deterministic: got {deterministic!r}; expected True or False", 2, False)
  try:
    cache = runtime.resolve_cache_dir(config.get("compilation_cache", "auto"))
  except ValueError as e:
    _fail(f"config.{e}", 2, False)
  runtime.set_deterministic(deterministic)
  try:
    runtime.set_compilation_cache(cache)
  except OSError as e:
    _fail(f"config.compilation_cache: cannot use {cache!r} ({e.strerror or e}); expected a "
          "writable folder, or 'none'", 2, False)


def _initialize_distributed():
  """``jax.distributed.initialize`` for ``--distributed``, before any device is touched."""
  given = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
           "process_id": _PROCESS_ID.value}
  if not _DISTRIBUTED.value:
    named = [f"--{k}" for k, v in given.items() if v is not None]
    if named:
      _fail(f"{', '.join(named)}: only with --distributed", 2, False)
    return
  import jax
  try:
    jax.distributed.initialize(**given)
  except (RuntimeError, ValueError) as e:
    _fail(f"--distributed: jax.distributed.initialize failed ({e}); on a cluster without "
          "auto-detection pass --coordinator_address=HOST:PORT --num_processes=N "
          "--process_id=I", 2, _VERBOSE.value)


def _group(argv):
  """``mtjax group``: prints the affinity and the best grouping; writes grouping_<K>.md."""
  import os

  from mtjax import relations

  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}", 2, False)
  if _WORKDIR.value is None or _GROUPS.value is None:
    _fail("mtjax group needs --workdir (a finished run) and --groups K", 2, False)
  try:
    names, affinity, count = relations.run_affinity(_WORKDIR.value)
    groups, score = relations.group_tasks(affinity, _GROUPS.value)
  except ValueError as e:
    message = str(e)
    _fail(message if message.startswith("--") else f"--groups / --workdir: {message}", 2,
          _VERBOSE.value)
  table = relations.format_grouping(names, affinity, groups, score)
  text = (f"Inter-task affinity (TAG, mean of {count} steps; row: the task whose step, "
          f"column: the task whose loss)\n\n{table}")
  print(text)
  with open(os.path.join(_WORKDIR.value, f"grouping_{_GROUPS.value}.md"), "w") as f:
    f.write(text + "\n")


def _run(command: str):
  if command == "group":
    return _group

  def run(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {argv[1:]}", 2, False)
    if not flags.FLAGS["config"].present or _WORKDIR.value is None:
      _fail("--config and --workdir are required", 2, False)
    config = _config()
    _apply_runtime(config)
    _initialize_distributed()
    from mtjax.train import loop  # after flag parsing: keeps `--help` fast

    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO

    try:
      if command == "train":
        loop.train(config, _WORKDIR.value, progress=_PROGRESS.value)
      else:
        loop.evaluate(config, _WORKDIR.value)
    except UserError as e:
      _fail(e, 2, _VERBOSE.value)
    except RunError as e:
      _fail(e, 1, _VERBOSE.value)
  return run


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  code = cli_help.main_help(argv)  # mtjax, --help, list: answered without parsing flags
  if code is not None:
    sys.exit(code)
  argv = cli_help.resolve_config_args(argv)  # --config shapes: a config shipped with mtjax
  app.run(_run(argv[1]), argv=[f"mtjax {argv[1]}", *argv[2:]], flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
