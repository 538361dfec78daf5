"""Optimisation strategies: which parameter groups train and which task losses count, by step.

A strategy is a pure function of the step, ``phase_at(step) -> Phase``, on the host; the
trainer compiles one step per distinct phase (cached) and the loop picks it from the step
number, so a resumed run is in the same phase at the same step.

* ``"end_to_end"`` (default): everything trains on the joint loss at every step.
* ``"alternating"``: cycles of ``phases.specific_steps`` steps with the shared parameters
  frozen (the task-specific ones train), then ``phases.shared_steps`` steps with every task's
  parameters frozen (the shared ones train), as in alternating / block-coordinate training.
* ``"alternating_taskwise"``: one task per step in round robin (``step % T``): only its loss
  counts and the other heads are frozen (the alternate training of early MTL work, e.g.
  Dong et al. 2015).
* ``"progressive"``: the first ``phases.initial_tasks`` tasks train with the backbone from step
  0; every ``phases.add_every`` steps the next task (in ``config.tasks`` order) is added. A task
  not yet added neither trains (its head is frozen) nor contributes a loss (weight 0).
  ``phases.freeze_shared``: once the first task is added the shared parameters are frozen
  (train the backbone first, then heads on a fixed backbone).

Frozen groups are not differentiated (``stop_gradient``) and the optimizer skips them
(:func:`mtjax.train.optim.make_grouped_optimizer`: their state is kept bitwise).
"""

from typing import NamedTuple

from mtjax.models import labels

STRATEGIES = ("end_to_end", "alternating", "alternating_taskwise", "progressive")
PHASE_DEFAULTS = {"specific_steps": 50, "shared_steps": 50, "initial_tasks": 1,
                  "add_every": 100, "freeze_shared": False}


class Phase(NamedTuple):
  """What one step trains: label prefixes it freezes, and which tasks' losses count."""

  frozen: tuple[str, ...] = ()
  active: tuple[bool, ...] | None = None  # None: every task


END_TO_END = Phase()


def options(phases) -> dict:
  """``config.phases`` with the defaults filled in."""
  out = dict(PHASE_DEFAULTS)
  out.update(dict(phases or {}))
  return out


def check(strategy: str, phases, names, level: str) -> None:
  """Raises ValueError naming the config field when the strategy cannot run."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy: got {strategy!r}; expected one of {STRATEGIES}")
  opts = options(phases)
  unknown = sorted(set(opts) - set(PHASE_DEFAULTS))
  if unknown:
    raise ValueError(f"phases: unknown field(s) {unknown}; expected {sorted(PHASE_DEFAULTS)}")
  if strategy == "end_to_end":
    return
  if level != "loss":
    raise ValueError(
        f"strategy: {strategy!r} needs a loss-level weighting method (a frozen or absent "
        f"task gives a gradient method zero gradients); got a {level}-level one: use "
        "strategy='end_to_end' or a loss-level method (ew, uw, dwa, rlw, ...)")
  for field in ("specific_steps", "shared_steps", "add_every"):
    value = opts[field]
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
      raise ValueError(f"phases.{field}: got {value!r}; expected an int >= 1")
  n = opts["initial_tasks"]
  if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(names)):
    raise ValueError(f"phases.initial_tasks: got {n!r}; expected an int from 1 to "
                     f"{len(names)} (the number of tasks)")
  if not isinstance(opts["freeze_shared"], bool):
    raise ValueError(f"phases.freeze_shared: got {opts['freeze_shared']!r}; expected a bool")


def phase_at(strategy: str, phases, names, step: int) -> Phase:
  """The phase of 0-based ``step`` (the update that makes step ``step + 1``)."""
  names = tuple(names)
  if strategy == "end_to_end":
    return END_TO_END
  opts = options(phases)
  if strategy == "alternating":
    cycle = opts["specific_steps"] + opts["shared_steps"]
    if step % cycle < opts["specific_steps"]:
      return Phase(frozen=(labels.SHARED,))
    return Phase(frozen=names)
  if strategy == "alternating_taskwise":
    t = step % len(names)
    return Phase(frozen=names[:t] + names[t + 1:],
                 active=tuple(i == t for i in range(len(names))))
  if strategy == "progressive":
    n = min(len(names), opts["initial_tasks"] + step // opts["add_every"])
    shared = (labels.SHARED,) if opts["freeze_shared"] and n > opts["initial_tasks"] else ()
    return Phase(frozen=shared + names[n:], active=tuple(i < n for i in range(len(names))))
  raise ValueError(f"strategy: got {strategy!r}; expected one of {STRATEGIES}")


def distinct_phases(strategy: str, phases, names, first: int, last: int) -> list[Phase]:
  """The distinct phases of steps ``first .. last - 1``, in order of first use."""
  seen = {}
  for step in range(first, last):
    seen.setdefault(phase_at(strategy, phases, names, step), None)
  return list(seen)
