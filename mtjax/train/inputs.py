"""The run's data: every split is a mixture of datasets (one dataset is a mixture of one).

:func:`read_split` reads one split of one :class:`mtjax.train.setup.DatasetEntry` (built into
its data dir first if needed); :func:`load_mixture` reads a split of every entry and draws the
run's steps from them (:func:`mtjax.data.mixing.plan`; one dataset: every step from it, its
n-th step reading its n-th batch). A task labelled by every dataset needs no mask, so a
mixture of one yields exactly the batches of :func:`mtjax.data.pipeline.train_batch`. The
input position saved with a checkpoint is :func:`mtjax.data.mixing.position`;
:func:`resume_step` also reads the one-dataset position of :func:`mtjax.data.pipeline.position`
that checkpoints of a single dataset hold when written by mtjax before the mixture.
"""

import os
from typing import NamedTuple

import jax

from mtjax import data
from mtjax import tasks as tasks_lib
from mtjax.data import mixing, pipeline, sources
from mtjax.errors import UserError


def read_split(entry, split: str, label_keys, image_size):
  """The arrays of ``split`` of ``entry`` (a :class:`mtjax.train.setup.DatasetEntry`), or for a
  dataset read lazily its :class:`mtjax.data.sources.Source`, with only ``label_keys``.

  Several processes: process 0 reads first (it may build the dataset into a data dir the hosts
  share), the others after it.
  """
  name, field = entry.name, entry.field
  data_dir = entry.data_dir or None
  size = tuple(image_size)
  split_sizes = dict(entry.split_sizes)

  def read():  # the keys are picked first; a small dataset is then read whole
    source = pipeline.select(data.open_split(name, split, image_size=size, data_dir=data_dir,
                                             split_sizes=split_sizes), label_keys)
    return sources.read_all(source) if data.reads_whole(name, source) else source
  try:
    if jax.process_count() > 1:
      after_process_zero(lambda: data.open_split(name, split, image_size=size, data_dir=data_dir,
                                                 split_sizes=split_sizes))
    return read()
  except OSError as e:
    if isinstance(e, FileNotFoundError) and e.filename is None:  # its message has the layout
      raise UserError(f"config.{field}.data_dir: {e}") from None
    where = data_dir or os.environ.get("MTJAX_DATA_DIR") or "~/tensorflow_datasets"
    raise UserError(
        f"config.{field}.data_dir (else $MTJAX_DATA_DIR): cannot build or read dataset "
        f"{name!r} in {where!r}: {e.strerror or e}"
        f"{f' ({e.filename})' if e.filename else ''}; expected a writable folder") from e
  except UserError:
    raise
  except ValueError as e:   # a field of config.dataset, or files that do not match the layout
    key = str(e).split(":")[0]
    where = {"image_size": "dataset.image_size", "split_sizes": f"{field}.split_sizes"}.get(
        key, f"{field}.data_dir")
    raise UserError(f"config.{where}: {str(e).removeprefix(key + ': ')}") from None


def after_process_zero(prepare) -> None:
  """Runs ``prepare()`` on process 0, then (after a barrier) on the other processes: hosts
  that share a data dir build a dataset once, instead of racing to rename the same folder."""
  from jax.experimental import multihost_utils
  primary = jax.process_index() == 0
  error = None
  if primary:
    try:
      prepare()
    except Exception as e:  # noqa: BLE001 -- raised after the barrier, which the others wait at
      error = e
  multihost_utils.sync_global_devices("mtjax: dataset prepared by process 0")
  if error is not None:
    raise error
  if not primary:
    prepare()


class Mixture(NamedTuple):
  """The datasets of one split, and the run's draws from them."""
  keys: tuple              # the entries' keys, in the config's order
  datasets: list           # [(data, labelled tasks), ...] (arrays or sources)
  label_specs: dict        # {task: label spec} of the tasks some dataset does not label
  transforms: list         # each dataset's augmentation
  steps: mixing.Plan       # the dataset and draw of each step of the run
  sampler: str

  def sizes(self) -> dict:
    return {k: pipeline.size(d) for k, (d, _) in zip(self.keys, self.datasets, strict=True)}

  def labelled(self):
    """Each dataset with every task's keys (its unlabelled tasks masked), for evaluation."""
    return [mixing.with_labels(d, t, self.label_specs) for d, t in self.datasets]


def load_mixture(inputs, split: str, tasks, num_steps: int) -> Mixture:
  """``split`` of every dataset of ``inputs`` (a :class:`mtjax.train.setup.Inputs`), each read
  with its own tasks' label keys, and the :func:`mtjax.data.mixing.plan` of the run's steps
  (the draws of training and of a meta method's batches; evaluation reads
  :meth:`Mixture.labelled`, not augmented)."""
  datasets = []
  for entry in inputs.entries:
    keys = tuple(dict.fromkeys(k for t in entry.tasks for k in tasks_lib.label_keys(tasks[t])))
    datasets.append((read_split(entry, split, keys, inputs.image_size), tuple(entry.tasks)))
  steps = mixing.plan([pipeline.size(d) for d, _ in datasets], inputs.sampler, seed=inputs.seed,
                      stop=max(num_steps, 1), num_steps=num_steps)
  partial = {name: task.label_spec(tuple(inputs.image_size)) for name, task in tasks.items()
             if any(name not in labelled for _, labelled in datasets)}
  return Mixture(tuple(e.key for e in inputs.entries), datasets, partial,
                 list(inputs.transforms), steps,
                 inputs.sampler)


def batch_of(mix: Mixture, step: int, *, batch_size: int, seed: int, num_steps: int) -> dict:
  """This process's share of the batch of ``step`` drawn from ``mix`` (``seed``: the order's)."""
  return mixing.mixed_batch(mix.datasets, seed=seed, step=step, batch_size=batch_size,
                            sampler=mix.sampler, num_steps=num_steps,
                            label_specs=mix.label_specs, transforms=mix.transforms,
                            steps=mix.steps, process_index=jax.process_index(),
                            process_count=jax.process_count())[1]


def stream(mix: Mixture, inputs, start: int, stop: int, num_steps: int):
  """Yields ``(step, this process's batch)`` for ``start <= step < stop``, read ahead in
  ``inputs.num_workers`` threads; the grain loaders (one dataset) read in their own workers.
  The same values whatever the loader and the workers' timing."""
  if inputs.loader != "threads":
    (only, _), = mix.datasets
    yield from pipeline.batches(only, seed=inputs.seed, start=start, stop=stop,
                                batch_size=inputs.batch_size, transform=mix.transforms[0],
                                num_workers=inputs.num_workers, loader=inputs.loader,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    return

  def make(step):
    return batch_of(mix, step, batch_size=inputs.batch_size, seed=inputs.seed,
                    num_steps=num_steps)
  yield from pipeline.read_ahead(make, start, stop, num_workers=inputs.num_workers)


def check_mixture(mix: Mixture, inputs, tasks) -> None:
  """Each dataset's first batch (this process's share of it) against the tasks, and the same
  layout (keys, shapes, dtypes) for all of them: one compiled step serves every dataset."""
  first, layout = None, None
  share = inputs.batch_size // jax.process_count()
  for k, entry in enumerate(inputs.entries):
    data_, labelled = mix.datasets[k]
    batch = mixing.complete_labels(pipeline.train_batch(
        data_, seed=inputs.seed, step=0, batch_size=inputs.batch_size,
        transform=mix.transforms[k], process_index=jax.process_index(),
        process_count=jax.process_count()), labelled, mix.label_specs)
    try:
      tasks_lib.check_batch(tasks, batch, inputs.image_size, share)
    except ValueError as e:
      raise UserError(f"config.{entry.field}: dataset {entry.name!r}: {e}") from None
    now = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    if layout is None:
      first, layout = entry.field, now
    elif now != layout:
      diff = sorted(k for k in set(now) | set(layout) if now.get(k) != layout.get(k))
      raise UserError(
          f"config.{entry.field}: its batches differ from those of config.{first} in "
          + ", ".join(f"{k} ({now.get(k)} vs {layout.get(k)})" for k in diff)
          + "; expected the same keys, shapes and dtypes (one compiled step for all datasets)")


def _order(inputs, num_steps: int) -> dict:
  return dict(batch_size=inputs.batch_size, seed=inputs.seed, sampler=inputs.sampler,
              num_steps=num_steps, process_count=jax.process_count())


def position(mix: Mixture, step: int, inputs, num_steps: int) -> dict:
  """The input position after ``step`` steps, saved with a checkpoint."""
  return mixing.position(mix.steps, step, mix.sizes(), **_order(inputs, num_steps))


def resume_step(saved: dict, mix: Mixture, inputs, num_steps: int, step: int) -> int:
  """The step a saved position continues from (``step``, the checkpoint's, if none was saved).
  A position of one dataset without ``"datasets"`` is that of
  :func:`mtjax.data.pipeline.position`. ValueError if the order changed."""
  if not saved:
    return step
  if "datasets" not in saved:
    (only, _), = mix.datasets
    return pipeline.resume_step(saved, pipeline.size(only), inputs.batch_size, inputs.seed,
                                jax.process_count())
  return mixing.resume_step(saved, mix.steps, mix.sizes(), **_order(inputs, num_steps))


def first_examples(split, n: int) -> dict | None:
  """The first ``n`` examples of a split: arrays in memory, or a dataset read lazily (a
  :class:`mtjax.data.sources.Source`: only those ``n`` are read); None when ``n <= 0``."""
  if n <= 0:
    return None
  if isinstance(split, sources.Source):
    return sources.read_all(split, min(n, split.size))
  return {k: v[:n] for k, v in split.items()}
