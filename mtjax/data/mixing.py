"""Several datasets, one set of tasks: partial labels and a dataset sampler.

When each dataset labels only some of the tasks (detection from COCO, segmentation from
another set; Office-31-style one domain per task), a batch comes from one dataset per step and
the tasks it does not label are masked out: :func:`complete_labels` fills their label keys with
zeros and sets ``<task>_mask`` to 0 (1 for the tasks it labels), so that every batch has the
same keys and shapes (one compilation) and the tasks' losses and metrics skip the missing labels
(``mtjax.tasks.base.example_mask``).

Which dataset a step draws from is a pure function of ``(seed, step)``
(:func:`dataset_schedule`), with the sampling distributions of Stickland & Murray (2019, §4):
``uniform`` (1/K), ``proportional`` (N_k / Σ N) and ``annealed`` (∝ N_k^α with
α = 1 - 0.8 t / (T - 1) over the run's T steps, their Eq. 7 with steps for epochs). The k-th
draw of a dataset reads its k-th batch (:func:`plan`, :func:`mixed_batch`), so each dataset
goes through its own epochs in its own (seed + k, epoch) order and a run resumes from its step
alone (:func:`position`, :func:`resume_step`).

What a masked task means for the weighting methods: on a step whose dataset does not label
task t, t's loss is exactly 0 and so is its gradient (its head's, and its row of the per-task
gradients of the shared part). Loss-level methods see a loss vector with a 0 entry; gradient-
level methods a zero row, which a method treats as it treats any zero gradient (e.g. MGDA's
min-norm point of a hull that holds 0 is 0: no shared update on that step). See the user guide's
"Several datasets in one run" (docs/guide/data.md) for the methods this refuses or changes.
"""

from typing import NamedTuple

import numpy as np

from mtjax.data import pipeline, sources

SAMPLERS = ("uniform", "proportional", "annealed")
_BLOCK = 4096   # steps drawn per generator: the schedule is a pure function of (seed, step)


def probabilities(sizes, sampler: str, step=0, num_steps: int = 1) -> np.ndarray:
  """(K,) probabilities of drawing each dataset at ``step`` of ``num_steps`` ((S, K) for an
  array of S steps)."""
  sizes = np.asarray(sizes, np.float64)
  if sampler == "uniform":
    p = np.ones_like(sizes)
  elif sampler == "proportional":
    p = sizes
  elif sampler == "annealed":
    alpha = 1.0 - 0.8 * np.asarray(step, np.float64) / max(num_steps - 1, 1)
    p = sizes ** np.expand_dims(alpha, -1)
  else:
    raise ValueError(f"sampler: got {sampler!r}, allowed: {list(SAMPLERS)}")
  if np.ndim(step) and p.ndim == 1:
    p = np.broadcast_to(p, (len(step), len(sizes)))
  return p / p.sum(axis=-1, keepdims=True)


def dataset_schedule(sizes, sampler: str, *, seed: int, stop: int, num_steps: int) -> np.ndarray:
  """(stop,) the dataset drawn at each step ``0 .. stop - 1``: a pure function of (seed, step)."""
  out = np.empty((stop,), np.int64)
  for block in range(0, stop, _BLOCK):
    steps = np.arange(block, min(block + _BLOCK, stop))
    u = np.random.default_rng([seed, block // _BLOCK, 3]).random(_BLOCK)[:len(steps)]
    cdf = np.cumsum(probabilities(sizes, sampler, steps, num_steps), axis=-1)
    out[block:block + len(steps)] = np.minimum((u[:, None] >= cdf).sum(axis=1), len(sizes) - 1)
  return out


class Plan(NamedTuple):
  """The datasets' draws of steps ``0 .. len(schedule) - 1``."""
  schedule: np.ndarray   # (S,) the dataset drawn at each step
  draw: np.ndarray       # (S,) how often that dataset was drawn before the step


def plan(sizes, sampler: str, *, seed: int, stop: int, num_steps: int) -> Plan:
  """The :func:`dataset_schedule` of steps ``0 .. stop - 1`` and each step's draw number."""
  schedule = dataset_schedule(sizes, sampler, seed=seed, stop=stop, num_steps=num_steps)
  draw = np.zeros_like(schedule)
  for k in range(len(sizes)):
    at = np.flatnonzero(schedule == k)
    draw[at] = np.arange(len(at))
  return Plan(schedule, draw)


def complete_labels(batch: dict, labelled, label_specs: dict) -> dict:
  """``batch`` with every task's keys: zeros and ``<task>_mask`` 0 for the tasks not in
  ``labelled``; for the others ``<task>_mask`` 1 (or the dataset's own per-example mask).

  ``label_specs``: ``{task: task.label_spec(image_size)}``. A key two tasks share (e.g.
  ``depth_valid``) is kept where one of them is labelled.
  """
  size = len(batch["image"])
  out = dict(batch)
  for task, spec in label_specs.items():
    if task in labelled:
      out.setdefault(f"{task}_mask", np.ones((size,), np.float32))
    else:
      out[f"{task}_mask"] = np.zeros((size,), np.float32)
    for key, (shape, dtype) in spec.items():
      if key not in out:
        out[key] = np.zeros((size, *shape), np.dtype(dtype))
  return out


def with_labels(data, labelled, label_specs: dict):
  """``data`` (arrays or a source) whose examples carry every task's keys
  (:func:`complete_labels`): for evaluating each task on the datasets that label it."""
  if not isinstance(data, sources.Source):
    return complete_labels(data, labelled, label_specs)

  def one(example):
    batch = complete_labels({k: np.asarray(v)[None] for k, v in example.items()}, labelled,
                            label_specs)
    return {k: v[0] for k, v in batch.items()}
  read_many = None if data.read_many is None else (
      lambda idx: [one(e) for e in data.read_many(idx)])
  return sources.Source(data.size, lambda i: one(data.read(i)), read_many)


def mixed_batch(datasets, *, seed: int, step: int, batch_size: int, sampler: str,
                num_steps: int, label_specs: dict, transform=None, transforms=None,
                steps: Plan | None = None, process_index: int = 0,
                process_count: int = 1) -> tuple[int, dict]:
  """``(k, batch)``: the dataset drawn at ``step`` and its next batch, labels completed.

  ``datasets``: ``[(data, labelled tasks), ...]`` (arrays or sources). Dataset k's batches
  follow its own order (seed + k), its n-th draw reading its n-th batch. ``steps``: the run's
  :func:`plan` (else drawn here up to ``step``); ``transforms``: one augmentation per dataset
  (else ``transform`` for all).
  """
  if steps is None or len(steps.schedule) <= step:
    steps = plan([pipeline.size(d) for d, _ in datasets], sampler, seed=seed, stop=step + 1,
                 num_steps=num_steps)
  k, draw = int(steps.schedule[step]), int(steps.draw[step])
  data, labelled = datasets[k]
  batch = pipeline.train_batch(data, seed=seed + k, step=draw, batch_size=batch_size,
                               transform=transform if transforms is None else transforms[k],
                               process_index=process_index, process_count=process_count)
  return k, complete_labels(batch, labelled, label_specs)


def batches(datasets, *, seed: int, start: int, stop: int, batch_size: int, sampler: str,
            num_steps: int, label_specs: dict, transforms=None, steps: Plan | None = None,
            num_workers: int = 0, prefetch: int = 2, process_index: int = 0,
            process_count: int = 1):
  """Yields ``(step, mixed batch of step)`` for ``start <= step < stop``, read ahead in
  ``num_workers`` threads (:func:`mtjax.data.pipeline.read_ahead`): the same values whatever
  the workers' timing."""
  if steps is None:
    steps = plan([pipeline.size(d) for d, _ in datasets], sampler, seed=seed, stop=stop,
                 num_steps=num_steps)

  def make(step):
    return mixed_batch(datasets, seed=seed, step=step, batch_size=batch_size, sampler=sampler,
                       num_steps=num_steps, label_specs=label_specs, transforms=transforms,
                       steps=steps, process_index=process_index,
                       process_count=process_count)[1]
  yield from pipeline.read_ahead(make, start, stop, num_workers=num_workers, prefetch=prefetch)


def position(steps: Plan, step: int, sizes: dict, *, batch_size: int, seed: int, sampler: str,
             num_steps: int, process_count: int = 1) -> dict:
  """The position of every dataset after ``step`` steps, JSON-ready: for each dataset (``sizes``:
  ``{key: split size}``, in the config's order) its draws so far and its
  :func:`mtjax.data.pipeline.position` (epoch, batch in epoch), with what the order depends on."""
  done = steps.schedule[:step]
  out = {"step": int(step), "seed": int(seed), "sampler": sampler, "num_steps": int(num_steps),
         "batch_size": int(batch_size), "process_count": int(process_count), "datasets": {}}
  for k, (key, n) in enumerate(sizes.items()):
    draws = int(np.sum(done == k))
    out["datasets"][key] = {"draws": draws, "num_examples": int(n),
                            **pipeline.position(draws, n, batch_size)}
  return out


def resume_step(pos: dict, steps: Plan, sizes: dict, *, batch_size: int, seed: int, sampler: str,
                num_steps: int, process_count: int = 1) -> int:
  """The step to continue from at a saved :func:`position`; ValueError if an order changed."""
  now = position(steps, pos["step"], sizes, batch_size=batch_size, seed=seed, sampler=sampler,
                 num_steps=num_steps, process_count=process_count)
  changed = [f"{k} saved {pos[k]}, now {now[k]}" for k in now if k != "datasets"
             and k in pos and pos[k] != now[k]]
  if list(pos.get("datasets", {})) != list(now["datasets"]):
    changed.append(f"datasets saved {list(pos.get('datasets', {}))}, now {list(now['datasets'])}")
  else:
    for key, saved in pos["datasets"].items():
      changed += [f"datasets.{key}.{k} saved {v}, now {now['datasets'][key][k]}"
                  for k, v in saved.items() if now["datasets"][key].get(k) != v]
  if changed:
    raise ValueError("the saved input pipeline position is of another order: "
                     + ", ".join(changed))
  return int(pos["step"])
