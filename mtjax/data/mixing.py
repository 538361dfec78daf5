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
draw of a dataset reads its k-th batch (:func:`mixed_batch`), so each dataset goes through its
own epochs in its own (seed, epoch) order and a run resumes from its step alone.
"""

import numpy as np

from mtjax.data import pipeline

SAMPLERS = ("uniform", "proportional", "annealed")
_BLOCK = 4096   # steps drawn per generator: the schedule is a pure function of (seed, step)


def probabilities(sizes, sampler: str, step: int = 0, num_steps: int = 1) -> np.ndarray:
  """(K,) probabilities of drawing each dataset at ``step`` of ``num_steps``."""
  sizes = np.asarray(sizes, np.float64)
  if sampler == "uniform":
    p = np.ones_like(sizes)
  elif sampler == "proportional":
    p = sizes
  elif sampler == "annealed":
    alpha = 1.0 - 0.8 * step / max(num_steps - 1, 1)
    p = sizes ** alpha
  else:
    raise ValueError(f"sampler: got {sampler!r}, allowed: {list(SAMPLERS)}")
  return p / p.sum()


def dataset_schedule(sizes, sampler: str, *, seed: int, stop: int, num_steps: int) -> np.ndarray:
  """(stop,) the dataset drawn at each step ``0 .. stop - 1``: a pure function of (seed, step)."""
  out = np.empty((stop,), np.int64)
  for block in range(0, stop, _BLOCK):
    steps = np.arange(block, min(block + _BLOCK, stop))
    u = np.random.default_rng([seed, block // _BLOCK, 3]).random(_BLOCK)[:len(steps)]
    if sampler == "annealed":
      cdf = np.stack([np.cumsum(probabilities(sizes, sampler, s, num_steps)) for s in steps])
    else:
      cdf = np.broadcast_to(np.cumsum(probabilities(sizes, sampler)), (len(steps), len(sizes)))
    out[block:block + len(steps)] = np.minimum((u[:, None] >= cdf).sum(axis=1), len(sizes) - 1)
  return out


def complete_labels(batch: dict, labelled, label_specs: dict) -> dict:
  """``batch`` with every task's keys: zeros and ``<task>_mask`` 0 for the tasks not in
  ``labelled``, ``<task>_mask`` 1 for the others.

  ``label_specs``: ``{task: task.label_spec(image_size)}``. A key two tasks share (e.g.
  ``depth_valid``) is kept where one of them is labelled.
  """
  size = len(batch["image"])
  out = dict(batch)
  for task, spec in label_specs.items():
    here = task in labelled
    out[f"{task}_mask"] = np.full((size,), 1.0 if here else 0.0, np.float32)
    for key, (shape, dtype) in spec.items():
      if key not in out:
        out[key] = np.zeros((size, *shape), np.dtype(dtype))
  return out


def mixed_batch(datasets, *, seed: int, step: int, batch_size: int, sampler: str,
                num_steps: int, label_specs: dict, transform=None) -> tuple[int, dict]:
  """``(k, batch)``: the dataset drawn at ``step`` and its next batch, labels completed.

  ``datasets``: ``[(data, labelled tasks), ...]`` (arrays or sources). Dataset k's batches
  follow its own order (seed + k), its n-th draw reading its n-th batch.
  """
  sizes = [pipeline.size(d) for d, _ in datasets]
  schedule = dataset_schedule(sizes, sampler, seed=seed, stop=step + 1, num_steps=num_steps)
  k = int(schedule[step])
  draw = int(np.sum(schedule[:step] == k))
  data, labelled = datasets[k]
  batch = pipeline.train_batch(data, seed=seed + k, step=draw, batch_size=batch_size,
                               transform=transform)
  return k, complete_labels(batch, labelled, label_specs)
