"""The input pipeline: batches as a pure function of (seed, step), so resuming is exact.

The data is either arrays in memory (the embedded dataset, read whole) or a random-access
:class:`mtjax.data.sources.Source` read lazily, batch by batch. The order within an epoch is a
permutation drawn from ``(seed, epoch)``; the batch of step ``s`` is slice
``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the remainder is dropped), and
each process of a multi-host run reads only its contiguous share of it (``jax.process_index``
/ ``process_count``; the step then splits it over the local devices). The random
augmentation of an example is drawn from ``(seed, epoch, index)``: no worker holds state, so
the pipeline's whole position is its step (:func:`position`, saved in each checkpoint), and
reading ahead in worker threads (:func:`batches`) changes no value.

On several hosts (``jax.distributed``) the evaluation batches are read whole and each process
sends only its rows to its devices (:func:`process_slice`).
"""

import concurrent.futures
from collections import deque

import numpy as np

from mtjax.data import sources

# Keys a dataset may add to its labels: per-example masks of missing labels (``<task>_mask``)
# and the normals' own validity (NYUv2); the tasks read them when present.
OPTIONAL_KEYS = ("normals_valid",)


def size(data) -> int:
  """The number of examples of arrays in memory or of a source."""
  if isinstance(data, sources.Source):
    return data.size
  return len(next(iter(data.values())))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if batch_size > num_examples:
    raise ValueError(f"batch_size: {batch_size} is larger than the training split "
                     f"({num_examples} examples)")
  return num_examples // batch_size


def position(step: int, num_examples: int, batch_size: int, seed: int | None = None,
             process_count: int = 1) -> dict:
  """The pipeline position of ``step``: ``{"epoch", "batch_in_epoch", ...}``, JSON-ready.

  With ``seed`` it also records what the order depends on (seed, split size, batch size,
  process count), which :func:`resume_step` checks.
  """
  per_epoch = steps_per_epoch(num_examples, batch_size)
  pos = {"epoch": int(step) // per_epoch, "batch_in_epoch": int(step) % per_epoch}
  if seed is not None:
    pos.update(step=int(step), seed=int(seed), num_examples=int(num_examples),
               batch_size=int(batch_size), process_count=int(process_count))
  return pos


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


def resume_step(pos: dict, num_examples: int, batch_size: int, seed: int,
                process_count: int = 1) -> int:
  """The step to continue from at a saved :func:`position`; ValueError if the order changed."""
  now = {"seed": seed, "num_examples": num_examples, "batch_size": batch_size,
         "process_count": process_count}
  changed = {k: (pos[k], v) for k, v in now.items() if k in pos and pos[k] != v}
  if changed:
    raise ValueError("the saved input pipeline position is of another order: "
                     + ", ".join(f"{k} saved {a}, now {b}" for k, (a, b) in changed.items()))
  return pos["epoch"] * steps_per_epoch(num_examples, batch_size) + pos["batch_in_epoch"]


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The permutation of the split in ``epoch``: a pure function of ``(seed, epoch)``."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, *, seed: int, step: int, batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The example indices of ``step`` this process reads (sorted within the global batch)."""
  pos = position(step, num_examples, batch_size)
  order = epoch_order(seed, pos["epoch"], num_examples)
  start = pos["batch_in_epoch"] * batch_size
  idx = np.sort(order[start:start + batch_size])
  if batch_size % process_count:
    raise ValueError(f"batch_size: {batch_size} is not a multiple of the process count "
                     f"({process_count})")
  share = batch_size // process_count
  return idx[process_index * share:(process_index + 1) * share]


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The random stream of example ``index``'s augmentation in ``epoch``."""
  return np.random.default_rng([seed, epoch, int(index), 1])


def _stack(examples) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def gather(data, indices, *, transform=None, seed: int = 0, epoch: int = 0) -> dict:
  """Examples ``indices`` of ``data`` stacked, each passed through ``transform(example, rng)``."""
  if not isinstance(data, sources.Source) and transform is None:
    return {k: v[indices] for k, v in data.items()}
  source = data if isinstance(data, sources.Source) else sources.array_source(data)
  examples = sources.read_examples(source, indices)
  if transform is not None:
    examples = [transform(e, augment_rng(seed, epoch, i))
                for e, i in zip(examples, indices, strict=True)]
  return _stack(examples)


def train_batch(data, *, seed: int, step: int, batch_size: int, transform=None,
                process_index: int = 0, process_count: int = 1) -> dict:
  """The training batch of ``step`` (this process's share): a pure function of (seed, step)."""
  n = size(data)
  idx = batch_indices(n, seed=seed, step=step, batch_size=batch_size,
                      process_index=process_index, process_count=process_count)
  epoch = position(step, n, batch_size)["epoch"]
  return gather(data, idx, transform=transform, seed=seed, epoch=epoch)


def batches(data, *, seed: int, start: int, stop: int, batch_size: int, transform=None,
            num_workers: int = 0, prefetch: int = 2, process_index: int = 0,
            process_count: int = 1, loader: str = "threads"):
  """Yields ``(step, train_batch(step))`` for ``start <= step < stop``.

  ``loader="threads"``: ``num_workers > 0`` reads and augments whole batches in that many
  threads, up to ``num_workers + prefetch`` batches ahead; memory holds at most that many
  batches (reading numpy files, PIL and the numpy kernels release the GIL). ``"grain"`` and
  ``"grain_processes"``: :func:`grain_batches`. The values are those of :func:`train_batch`
  whatever the loader and the workers' timing, so a run resumes from its step alone.
  """
  if loader not in LOADERS:
    raise ValueError(f"loader: got {loader!r}, allowed: {list(LOADERS)}")
  if loader != "threads":
    yield from grain_batches(data, seed=seed, start=start, stop=stop, batch_size=batch_size,
                             transform=transform, num_workers=num_workers, prefetch=prefetch,
                             processes=loader == "grain_processes", process_index=process_index,
                             process_count=process_count)
    return
  make = lambda step: train_batch(data, seed=seed, step=step, batch_size=batch_size,  # noqa: E731
                                  transform=transform, process_index=process_index,
                                  process_count=process_count)
  yield from read_ahead(make, start, stop, num_workers=num_workers, prefetch=prefetch)


def read_ahead(make, start: int, stop: int, *, num_workers: int = 0, prefetch: int = 2):
  """Yields ``(step, make(step))`` for ``start <= step < stop``, in order; ``num_workers > 0``
  threads compute up to ``num_workers + prefetch`` steps ahead (``make`` must be pure)."""
  if num_workers <= 0:
    for step in range(start, stop):
      yield step, make(step)
    return
  depth = num_workers + max(prefetch, 0)
  pending = deque()
  with concurrent.futures.ThreadPoolExecutor(num_workers, "mtjax-input") as pool:
    try:
      nxt = start
      while pending or nxt < stop:
        while nxt < stop and len(pending) < depth:
          pending.append((nxt, pool.submit(make, nxt)))
          nxt += 1
        step, future = pending.popleft()
        yield step, future.result()
    finally:
      for _, future in pending:
        future.cancel()


LOADERS = ("threads", "grain", "grain_processes")


def grain_module():
  """The grain package, or a ValueError saying how to install it."""
  try:
    import grain
  except ImportError:
    raise ValueError("the 'grain' and 'grain_processes' loaders need the grain package, which is "
                     "not installed: pip install 'mtjax[grain]' (or use loader 'threads', the "
                     "built-in one: the same batches)") from None
  return grain


def grain_batches(data, *, seed: int, start: int, stop: int, batch_size: int, transform=None,
                  num_workers: int = 2, prefetch: int = 2, processes: bool = False,
                  process_index: int = 0, process_count: int = 1):
  """:func:`batches` read by grain: a ``MapDataset`` over (step, slot) read and augmented
  example by example in ``num_workers`` threads, or worker processes with ``processes``
  (``IterDataset.mp_prefetch``: for augmentations that hold the GIL). Same values as
  :func:`train_batch`: each element is the pure function of its (step, slot)."""
  grain = grain_module()
  n = size(data)
  share = batch_size // max(process_count, 1)
  per_epoch = steps_per_epoch(n, batch_size)
  source = data if isinstance(data, sources.Source) else sources.array_source(data)

  def element(g):
    step, slot = divmod(int(g), share)
    idx = batch_indices(n, seed=seed, step=step, batch_size=batch_size,
                        process_index=process_index, process_count=process_count)[slot]
    example = source.read(int(idx))
    if transform is not None:
      example = transform(example, augment_rng(seed, step // per_epoch, idx))
    return example

  ds = grain.MapDataset.range(start * share, stop * share).map(element)
  ds = ds.batch(share, batch_fn=_stack)
  if processes and num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags (outside `mtjax` CLI)
      flags.FLAGS.mark_as_parsed()
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(prefetch, 1)))
  else:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(num_workers, 1),
                                              prefetch_buffer_size=max(num_workers, 1) + prefetch))
  yield from zip(range(start, stop), it, strict=True)


def eval_batches(data, batch_size: int):
  """The split in order, in batches of ``batch_size``; the last one padded, with ``mask`` 0."""
  num_examples = size(data)
  for start in range(0, num_examples, batch_size):
    stop = min(start + batch_size, num_examples)
    pad = batch_size - (stop - start)
    batch = gather(data, np.arange(start, stop))
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    mask = np.zeros((batch_size,), np.float32)
    mask[:stop - start] = 1.0
    batch["mask"] = mask
    yield batch


def select(data, keys):
  """The arrays the model and the tasks read (``image``, the tasks' label keys, and the
  :data:`OPTIONAL_KEYS` and ``<task>_mask`` keys the data has)."""
  def wanted(k):
    return k in ("image", *keys) or k in OPTIONAL_KEYS or k.endswith("_mask")
  if isinstance(data, sources.Source):
    def read(i):
      return {k: v for k, v in data.read(i).items() if wanted(k)}
    read_many = None if data.read_many is None else (
        lambda idx: [{k: v for k, v in e.items() if wanted(k)} for e in data.read_many(idx)])
    return sources.Source(data.size, read, read_many)
  return {k: v for k, v in data.items() if wanted(k) and (k in data)}

