"""Orbax checkpoints of the whole train state, with the run's metadata.

A checkpoint holds the state pytree (params, batch stats, optimizer and weighting states, step,
root PRNG key) and a JSON record (config identity, input pipeline position). Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a failure mid-save leaves the
earlier checkpoints intact; nothing here deletes a checkpoint except ``max_to_keep`` rotation
after a successful save.
"""

import os

import flax.serialization
import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: str) -> int | None:
  """The step of the newest complete checkpoint in ``directory``, or None."""
  if not os.path.isdir(directory):
    return None
  return ocp.CheckpointManager(os.path.abspath(directory)).latest_step()


def read_metadata(directory: str, step: int) -> dict:
  """The JSON record saved with checkpoint ``step``, without reading the arrays."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def save(mngr: ocp.CheckpointManager, state, metadata: dict) -> None:
  """Saves ``state`` at its step, with ``metadata``; blocks until it is on disk."""
  step = int(jax.device_get(state.step))
  state_dict = jax.device_get(flax.serialization.to_state_dict(state))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_dict),
                                          meta=ocp.args.JsonSave(metadata)), force=True)
  mngr.wait_until_finished()


def restore(directory: str, step: int, target):
  """``(state, metadata)`` of checkpoint ``step``, shaped like ``target`` (a fresh state)."""
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    flax.serialization.to_state_dict(target))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return flax.serialization.from_state_dict(target, restored["state"]), restored["meta"]
