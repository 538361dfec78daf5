"""Orbax checkpoints of the whole train state, with the run's metadata.

A checkpoint holds the state pytree (params, batch stats, optimizer and weighting states, step,
root PRNG key) and a JSON record (config identity, input pipeline position). Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a failure mid-save leaves the
earlier checkpoints intact; nothing here deletes a checkpoint except ``max_to_keep`` rotation
after a successful save.

A checkpoint that cannot be read back (a truncated or missing file) is found by
:func:`restore_newest`, which falls back to the newest readable one and moves the damaged ones
aside to ``damaged-<step>-<n>/`` (a name orbax ignores), for the user to inspect. A save that
fails (a full disk) raises :class:`mtjax.errors.RunError`; orbax only renames a complete
checkpoint into place, so the previous one stays usable.
"""

import os

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from mtjax.errors import RunError, UserError


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: str) -> int | None:
  """The step of the newest complete checkpoint in ``directory``, or None."""
  if not os.path.isdir(directory):
    return None
  return ocp.CheckpointManager(os.path.abspath(directory)).latest_step()


def all_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in ``directory``, newest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(ocp.CheckpointManager(os.path.abspath(directory)).all_steps(), reverse=True)


def read_metadata(directory: str, step: int) -> dict:
  """The JSON record saved with checkpoint ``step``, without reading the arrays."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def save(mngr: ocp.CheckpointManager, state, metadata: dict) -> None:
  """Saves ``state`` at its step, with ``metadata``; blocks until it is on disk."""
  step = int(jax.device_get(state.step))
  state_dict = flax.serialization.to_state_dict(state)
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves(state_dict)):
    state_dict = jax.device_get(state_dict)  # one host: numpy (FSDP shards gathered)
  # else several hosts: orbax writes each process's shards of the global arrays
  previous = mngr.latest_step()
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                            meta=ocp.args.JsonSave(metadata)), force=True)
    mngr.wait_until_finished()
  except OSError as e:
    kept = (f"the previous checkpoint (step {previous}) is intact" if previous is not None
            else "no earlier checkpoint exists")
    raise RunError(
        f"saving checkpoint step {step} in {mngr.directory} failed: {e.strerror or e}; {kept}. "
        "Free some space (or use another --workdir) and run the same command again to resume"
    ) from e


def restore(directory: str, step: int, target):
  """``(state, metadata)`` of checkpoint ``step``, shaped and laid out like ``target`` (a fresh
  state): each array is read straight into ``target``'s sharding, whatever mesh wrote it."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    flax.serialization.to_state_dict(target))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return flax.serialization.from_state_dict(target, restored["state"]), restored["meta"]


def all_finite(state) -> bool:
  """Whether every floating-point array of ``state`` is finite (on the host; this process's
  shards of a sharded array)."""
  def shards(x):
    if isinstance(x, jax.Array):
      return [np.asarray(s.data) for s in x.addressable_shards]
    return [np.asarray(x)]
  return all(np.all(np.isfinite(s)) for x in jax.tree_util.tree_leaves(state) for s in shards(x)
             if np.issubdtype(s.dtype, np.inexact))


def move_aside(directory: str, step: int) -> str:
  """Renames checkpoint ``step`` to ``damaged-<step>-<n>`` (orbax ignores it); the new path."""
  n = 0
  while os.path.exists(os.path.join(directory, f"damaged-{step}-{n}")):
    n += 1
  target = os.path.join(directory, f"damaged-{step}-{n}")
  os.rename(os.path.join(directory, str(step)), target)
  return target


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def restore_newest(directory: str, target, *, warn=print):
  """``(state, metadata, step)`` of the newest checkpoint that reads back.

  Each candidate's metadata and arrays are read (a truncated or missing file raises) and its
  arrays checked finite. When the newest cannot be read, ``warn`` is told which step and why,
  the next older is tried, and every newer step than the one restored is moved aside
  (:func:`move_aside`). Raises :class:`mtjax.errors.UserError` when none reads back, moving
  nothing: then the cause is more likely a changed program than damage.
  """
  failed = []
  for step in all_steps(directory):
    try:
      state, metadata = restore(directory, step, target)
      if int(jax.device_get(state.step)) != step:
        raise ValueError(f"it holds step {int(jax.device_get(state.step))}")
      if not all_finite(state):
        raise ValueError("it holds non-finite values")
    except Exception as e:  # noqa: BLE001 -- tensorstore raises plain Exception on a bad file
      failed.append((step, _reason(e)))
      continue
    for bad, why in failed:
      moved = move_aside(directory, bad)
      warn(f"checkpoint step {bad} cannot be read ({why}); moved it to {moved} and "
           f"continuing from step {step}")
    return state, metadata, step
  details = "; ".join(f"step {s}: {why}" for s, why in failed)
  raise UserError(f"no checkpoint in {directory} can be restored ({details}); they were left in "
                  "place: move the folder away to start afresh")
