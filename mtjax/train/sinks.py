"""Writers the loop hands its records to: the metrics log, TensorBoard, the progress bar, the
prediction figures and the results table. As in Flax's and scenic's trainers, which receive
a ``metric_writer``, the loop only says what happened (a record of a step, an image, the
final results); the sinks decide where it goes. Which process writes is decided once, in
:func:`open_sinks`: on several hosts process 0 writes the files, the others write nothing.

A record is a dict with ``step`` and ``split`` (``"train"``, ``"validation"``,
``"affinity"``) and the values of that step, as ``metrics.jsonl`` holds it.
"""

import json
import os
import sys
from typing import NamedTuple

import jax
import numpy as np

from mtjax import metrics
from mtjax.errors import UserError
from mtjax.train import figures


def primary() -> bool:
  """Whether this process writes the workdir's files (one host: always; several: process 0;
  orbax coordinates the checkpoints itself)."""
  return jax.process_index() == 0


def warn(message: str) -> None:
  """A one-line warning on stderr, as the command line prints its errors."""
  print(f"mtjax: warning: {message}", file=sys.stderr, flush=True)


class MetricsLog:
  """``metrics.jsonl``: one JSON object a record. Resuming at a checkpoint of step ``resumed``
  drops the lines written after it (by a run stopped before its next checkpoint) and a last
  line cut short by a kill; a fresh run starts an empty log."""

  def __init__(self, path: str, resumed: int | None):
    self.path = path
    if resumed is not None:
      rewind(path, resumed)
    elif os.path.exists(path):
      os.remove(path)
    self._file = open(path, "a")  # noqa: SIM115 -- closed by close()

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def rewind(path: str, step: int) -> None:
  """Keeps the log lines of steps ``<= step`` that were written whole."""
  if not os.path.exists(path):
    return
  lines = []
  with open(path) as f:
    for line in f:
      try:
        if line.endswith("\n") and json.loads(line)["step"] <= step:
          lines.append(line)
      except ValueError:
        pass
  with open(path, "w") as f:
    f.writelines(lines)


class Board:
  """TensorBoard event files (:class:`mtjax.train.figures.TensorBoard`): the scalars of the
  train and validation records, the figures' images."""

  def __init__(self, workdir: str, names):
    try:
      self._board = figures.TensorBoard(workdir, names)
    except ImportError as e:
      raise UserError(str(e)) from None

  def write(self, record: dict) -> None:
    if record["split"] in ("train", "validation"):
      self._board.scalars(record, record["step"])

  def image(self, tag: str, image, step: int) -> None:
    self._board.image(tag, image, step)

  def final(self, results: dict, step: int) -> None:
    self._board.scalars(flat(results["validation"]["metrics"], "final/validation"), step)

  def close(self) -> None:
    self._board.close()


class ProgressBar:
  """A tqdm bar over the run's steps, showing the task losses of the last train record; a
  warning when the count of skipped non-finite updates grows."""

  def __init__(self, first: int, total: int, enabled: bool):
    from tqdm.auto import tqdm
    self._bar = tqdm(total=total, initial=first, disable=not enabled, dynamic_ncols=True,
                     desc="train")
    self._skipped = 0

  def write(self, record: dict) -> None:
    if record["split"] != "train":
      return
    self._bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in record.items()
                           if k.startswith("loss/") and k.count("/") == 1})
    if record.get("skipped", 0) != self._skipped:
      self._skipped = record["skipped"]
      warn(f"step {record['step']}: {int(self._skipped)} non-finite update(s) skipped so far "
           "(config.nonfinite='skip')")

  def advance(self) -> None:
    self._bar.update(1)

  def close(self) -> None:
    self._bar.close()


class Sinks(NamedTuple):
  """The writers of one run; :meth:`write` hands a record to each."""

  writers: tuple           # each has write(record) and close()
  bar: ProgressBar
  board: Board | None
  workdir: str | None      # where the figures and results go (None: another process)

  def write(self, record: dict) -> None:
    for writer in self.writers:
      writer.write(record)

  def image(self, tag: str, image, step: int) -> None:
    if self.board is not None:
      self.board.image(tag, image, step)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def open_sinks(workdir: str, names, *, resumed: int | None, first: int, total: int,
               progress: bool, tensorboard: bool) -> Sinks:
  """The sinks of a run in ``workdir`` (process 0 of several: all; the others: the bar)."""
  bar = ProgressBar(first, total, progress and primary())
  if not primary():
    return Sinks((bar,), bar, None, None)
  board = Board(workdir, names) if tensorboard else None
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), resumed)
  return Sinks(tuple(w for w in (log, board, bar) if w is not None), bar, board, workdir)


def flat(results, prefix):
  """``{"<prefix>/<task>/<metric>": value}`` of ``{task: {metric: value}}``."""
  return {f"{prefix}/{t}/{m}": v for t, values in results.items() for m, v in values.items()}


def write_results(workdir: str, out: dict, tables, conflict_level, names,
                  conflict_threshold: float) -> None:
  """``results.json``, ``results.md`` (printed), ``curves.png`` and ``relations.png``."""
  text = "\n\n".join(tables)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  log_path = os.path.join(workdir, "metrics.jsonl")
  figures.plot_curves(log_path, os.path.join(workdir, "curves.png"),
                      {"step": out["step"], **flat(out["validation"]["metrics"], "validation")},
                      conflict_threshold=conflict_threshold)
  figures.relation_heatmaps(
      log_path, os.path.join(workdir, "relations.png"), tuple(names),
      titles={"conflict/cosine": f"conflict/cosine ({conflict_level} level)"}
      if conflict_level else None)


def results_table(results: dict, delta: float, title: str) -> str:
  return metrics.format_table(results, None if np.isnan(delta) else delta, title)
