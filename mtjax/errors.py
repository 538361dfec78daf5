"""The two kinds of error a run ends with when it is not a bug.

``mtjax train|eval`` print either as one line, ``mtjax: error: <message>``, without a traceback
(``--verbose`` shows it): a :class:`UserError` exits with 2, a :class:`RunError` with 1. Any
other exception is a bug of mtjax and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake the user can fix: a config field, the data dir, the workdir, a checkpoint's
  identity. The message names what is wrong (``config.<field>: got ...; expected ...``)."""


class RunError(RuntimeError):
  """A run that cannot go on: it diverged, or the disk is full. The message says what happened,
  what is on disk and what to do."""
