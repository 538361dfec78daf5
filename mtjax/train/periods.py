"""One schedule of the run's periods, read by the host loop and by the compiled step.

:func:`due` is written with ``%``, ``==`` and ``|`` only, so the same function decides on the
host (Python ints: is it time to log, evaluate, save?) and inside the jitted step (traced
ints: compute the gradient conflict, TAG's affinity at this step?).
"""

from typing import NamedTuple


def due(done, every: int, last: int = 0):
  """Whether step ``done`` (counted from 1) is one of a period's: ``done % every == 0`` or
  ``done == last``; never when ``every == 0``. Plain ints on the host, traced ints in the
  step: the host loop and the compiled step read one schedule."""
  if not every:
    return False
  hit = done % every == 0
  return hit | (done == last) if last else hit


class Periods(NamedTuple):
  """The run's schedule: how often it logs, evaluates, checkpoints, measures gradient conflict
  and TAG's affinity (0: never). ``num_steps``: the last step, which always logs."""

  num_steps: int
  log: int
  eval: int
  checkpoint: int
  conflict: int            # config.relations.conflict: the logging steps, else 0
  affinity: int

  def logs(self, done):
    return due(done, self.log, self.num_steps)

  def evaluates(self, done) -> bool:
    return bool(due(done, self.eval)) and done < self.num_steps

  def saves(self, done, last: int) -> bool:
    return bool(due(done, self.checkpoint)) or done == last

  def conflict_at(self, done):
    return due(done, self.conflict, self.num_steps)

  def affinity_at(self, done):
    return due(done, self.affinity)
