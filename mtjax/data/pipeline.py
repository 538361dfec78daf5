"""The input pipeline: batches as a pure function of (seed, step), so resuming is exact.

The whole split lives in host memory (the embedded dataset is small); the order within an
epoch is a permutation drawn from ``(seed, epoch)``, and the batch of step ``s`` is slice
``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the remainder is dropped).

On several hosts (``jax.distributed``) each process sends only its rows of the global batch to
its devices (:func:`process_slice`: block ``jax.process_index()`` of ``jax.process_count()``
equal blocks, in order): the global batch, so the trajectory, does not depend on the hosts.
"""

import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(f"batch_size: {batch_size} is larger than the training split "
                     f"({num_examples} examples)")
  return num_examples // batch_size


def position(step: int, num_examples: int, batch_size: int) -> dict:
  """The pipeline position of ``step``: ``{"epoch", "batch_in_epoch"}``."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  return {"epoch": int(step) // per_epoch, "batch_in_epoch": int(step) % per_epoch}


def process_slice(batch, process_index: int, process_count: int):
  """Process ``process_index``'s rows of a global ``batch`` (a dict of arrays or one array):
  contiguous block ``process_index`` of ``process_count`` equal blocks of the leading axis.
  One process: ``batch`` itself."""
  if process_count == 1:
    return batch
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: got {process_index}; expected 0 <= it < {process_count}")

  def rows(x):
    if len(x) % process_count:
      raise ValueError(f"batch_size: got {len(x)}, not a multiple of the {process_count} "
                       "processes (jax.process_count())")
    per = len(x) // process_count
    return x[process_index * per:(process_index + 1) * per]
  return {k: rows(v) for k, v in batch.items()} if isinstance(batch, dict) else rows(batch)


def train_batch(arrays: dict, *, seed: int, step: int, batch_size: int) -> dict:
  """The training batch of ``step``: a deterministic function of (seed, epoch, step)."""
  num_examples = len(next(iter(arrays.values())))
  pos = position(step, num_examples, batch_size)
  order = np.random.default_rng([seed, pos["epoch"]]).permutation(num_examples)
  start = pos["batch_in_epoch"] * batch_size
  idx = np.sort(order[start:start + batch_size])
  return {k: v[idx] for k, v in arrays.items()}


def eval_batches(arrays: dict, batch_size: int):
  """The split in order, in batches of ``batch_size``; the last one padded, with ``mask`` 0."""
  num_examples = len(next(iter(arrays.values())))
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    pad = batch_size - (stop - start)
    batch = {k: v[start:stop] for k, v in arrays.items()}
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    mask = np.zeros((batch_size,), np.float32)
    mask[:stop - start] = 1.0
    batch["mask"] = mask
    yield batch


def select(arrays: dict, keys) -> dict:
  """The arrays the model and the tasks read (``image`` and the tasks' label keys)."""
  return {k: arrays[k] for k in ("image", *keys)}
