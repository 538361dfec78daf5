"""``mtjax train|eval --config FILE[:ARG] --workdir DIR [--config.FIELD=VALUE ...]``."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("train", "eval")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An ml_collections config file, e.g. experiments/configs/shapes.py[:METHOD].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_PROGRESS = flags.DEFINE_bool("progress_bar", True, "Show a progress bar.")


def _run(command: str):
  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
      raise app.UsageError("--config and --workdir are required")
    from mtjax.train import loop  # after flag parsing: keeps `--help` fast

    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step at INFO

    if command == "train":
      loop.train(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value)
    else:
      loop.evaluate(_CONFIG.value, _WORKDIR.value)
  return run


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(f"usage: mtjax {{{'|'.join(COMMANDS)}}} --config FILE --workdir DIR "
          "[--config.FIELD=VALUE ...]", file=sys.stderr)
    sys.exit(2)
  app.run(_run(argv[1]), argv=[f"mtjax {argv[1]}", *argv[2:]])


if __name__ == "__main__":
  main()
