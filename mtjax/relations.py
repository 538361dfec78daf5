"""Task relations: gradient conflict, inter-task affinity (TAG) and task grouping.

Pure functions; the train step calls them behind a ``jax.lax.cond`` so that they cost nothing
at the steps that do not log them (:mod:`mtjax.train.trainer`).

* Gradient conflict (Yu et al. 2020, PCGrad's "conflicting gradients": ``cos(g_i, g_j) < 0``;
  counted here below :data:`CONFLICT_THRESHOLD`, -0.05): :func:`cosine_from_gram`,
  :func:`conflict_fraction`, :func:`conflict_metrics`.
* Inter-task affinity (Fifty et al. 2021, "Efficiently Identifying Task Groupings for
  Multi-Task Learning", TAG, eq. 1-3): the lookahead ``Z[i, j] = 1 - L_j(θ_s - η g_i,
  θ_j) / L_j(θ_s, θ_j)`` of task ``i``'s gradient step on the shared parameters onto task
  ``j``'s loss on the same batch: :func:`lookahead_affinity`.
* Task grouping (TAG section 3.3, network selection): :func:`group_tasks`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.weighting.base import gram

TINY = 1e-20  # a squared norm below this counts as a zero gradient (cosine 0, not NaN)

# A pair of task gradients conflicts when its cosine is below this (``config.relations.
# conflict_threshold``). PCGrad's definition is ``cos < 0``, but a cosine of -0.003 is a right
# angle for every practical purpose, and counting it made the default experiment's fraction jump
# between 0 and 2/3 on noise (its depth pairs cross zero by a few thousandths). To first order a
# step along g_i changes L_j by -η |g_i| |g_j| cos_ij: below |cos| = 0.05 that is under 5 % of
# what a step of the same length along g_j itself would do (angles within 87°-93°), so only
# pairs beyond it are counted. 0 restores PCGrad's definition.
CONFLICT_THRESHOLD = -0.05


def cosine_from_gram(gram_matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(cosine (T, T), norms (T,))`` of the task gradients whose Gram matrix is given.

  ``cos_ij = G_ij / sqrt(G_ii G_jj)``; a zero gradient has cosine 0 with every task (1 with
  itself), not NaN.
  """
  g = jnp.asarray(gram_matrix, jnp.float32)
  sq = jnp.diagonal(g)
  norms = jnp.sqrt(jnp.maximum(sq, 0.0))
  zero = sq <= TINY
  safe = jnp.where(zero, 1.0, norms)
  cos = g / (safe[:, None] * safe[None, :])
  cos = jnp.where(zero[:, None] | zero[None, :], 0.0, jnp.clip(cos, -1.0, 1.0))
  cos = jnp.where(jnp.eye(g.shape[0], dtype=bool), 1.0, cos)
  return cos, norms


def conflict_fraction(cosine: jax.Array, threshold: float = CONFLICT_THRESHOLD) -> jax.Array:
  """The fraction of task pairs ``i < j`` whose gradients conflict, ``cos_ij < threshold``
  (:data:`CONFLICT_THRESHOLD`; 0 is PCGrad's ``cos < 0``); 0 for one task."""
  cosine = jnp.asarray(cosine)
  t = cosine.shape[0]
  if t < 2:
    return jnp.zeros((), jnp.float32)
  upper = jnp.triu(jnp.ones((t, t), bool), k=1)
  hits = jnp.where(upper, cosine < threshold, False)
  return jnp.sum(hits).astype(jnp.float32) / (t * (t - 1) / 2)


def conflict_metrics(gram_matrix: jax.Array, threshold: float = CONFLICT_THRESHOLD) -> dict:
  """``{"conflict/cosine": (T, T), "conflict/grad_norm": (T,), "conflict/fraction": ()}``."""
  cos, norms = cosine_from_gram(gram_matrix)
  return {"conflict/cosine": cos, "conflict/grad_norm": norms,
          "conflict/fraction": conflict_fraction(cos, threshold)}


def conflict_threshold(relations_config) -> float:
  """``config.relations.conflict_threshold`` (absent: :data:`CONFLICT_THRESHOLD`), checked: a
  number in [-1, 0]."""
  value = (relations_config or {}).get("conflict_threshold", CONFLICT_THRESHOLD)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 0:
    raise ValueError(f"relations.conflict_threshold: got {value!r}; expected a number in "
                     f"[-1, 0] (a pair conflicts when its cosine is below it; default "
                     f"{CONFLICT_THRESHOLD})")
  return float(value)


def conflict_from_grads(task_grads) -> dict:
  """:func:`conflict_metrics` of task gradients stacked on a leading task axis (any pytree)."""
  return conflict_metrics(gram(task_grads))


def zeros_like(fn: Callable, *args):
  """Zeros shaped like ``fn(*args)`` (for the branch of a ``lax.cond`` that skips ``fn``)."""
  shapes = jax.eval_shape(fn, *args)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def when(pred, fn: Callable, *args):
  """``fn(*args)`` if ``pred`` (a traced bool), else zeros of its shapes: a ``lax.cond``, so
  XLA runs ``fn`` only at the steps where ``pred`` holds (``pred=True``/``False`` as Python
  bools: no cond at all)."""
  if pred is True:
    return fn(*args)
  skip = lambda *a: zeros_like(fn, *a)  # noqa: E731
  if pred is False:
    return skip(*args)
  return jax.lax.cond(pred, fn, skip, *args)


def lookahead_affinity(loss_of_shared: Callable, shared, lr) -> jax.Array:
  """TAG's inter-task affinity (Fifty et al. 2021, eq. 1-3) on one batch: ``(T, T)``.

  ``loss_of_shared(shared) -> (T,)`` is the task losses as a function of the shared
  parameters (the task-specific ones and the batch held fixed). Eq. 1: the lookahead shared
  parameters of task ``i``, ``θ_s - lr ∇_{θ_s} L_i``; eq. 2-3: ``Z[i, j] = 1 -
  L_j(lookahead_i) / L_j(θ_s)``, positive when ``i``'s step lowers ``j``'s loss. The T
  gradients come from one ``vmap`` over the VJP, the T lookahead losses from one ``vmap``
  over the forward pass. A zero loss gives a zero column (nothing to improve).
  """
  losses, vjp = jax.vjp(loss_of_shared, shared)
  eye = jnp.eye(losses.shape[0], dtype=losses.dtype)
  (task_grads,) = jax.vmap(vjp)(eye)

  def after(g):
    stepped = jax.tree_util.tree_map(lambda p, gi: p - jnp.asarray(lr, p.dtype) * gi,
                                     shared, g)
    return loss_of_shared(stepped)

  looked = jax.vmap(after)(task_grads)  # (i, j): L_j after task i's step
  base = jnp.where(losses == 0, 1.0, losses)
  return jnp.where(losses[None, :] == 0, 0.0, 1.0 - looked / base[None, :]).astype(jnp.float32)


def grouping_score(affinity, groups) -> float:
  """TAG's total inter-task affinity of ``groups`` (TAG section 3.3): the mean over tasks of
  each task's best score among the groups holding it, where a task's score in a group is the
  mean affinity onto it from the group's other tasks (``affinity[i, j]``: from ``i`` onto
  ``j``), and 0 alone (nothing transfers onto it)."""
  a = np.asarray(affinity, np.float64)
  best = np.full(a.shape[0], -np.inf)
  for group in groups:
    for j in group:
      others = [i for i in group if i != j]
      score = float(np.mean([a[i, j] for i in others])) if others else 0.0
      best[j] = max(best[j], score)
  if np.isinf(best).any():
    raise ValueError(f"groups {groups} do not cover every task of a {a.shape[0]}-task affinity")
  return float(best.mean())


def _partitions(items, k):
  """Every partition of ``items`` into exactly ``k`` non-empty blocks (each once)."""
  if k == 1:
    yield [list(items)]
    return
  if len(items) == k:
    yield [[x] for x in items]
    return
  if len(items) < k:
    return
  first, rest = items[0], items[1:]
  for part in _partitions(rest, k - 1):  # ``first`` alone
    yield [[first], *part]
  for part in _partitions(rest, k):  # ``first`` joins one of the k blocks
    for b in range(k):
      yield [blk if i != b else [first, *blk] for i, blk in enumerate(part)]


MAX_GROUPING_TASKS = 8


def group_tasks(affinity, num_groups: int) -> tuple[tuple[tuple[int, ...], ...], float]:
  """``(groups, score)``: the split of the tasks into ``num_groups`` disjoint groups with the
  highest :func:`grouping_score`, by exhaustive search (T ≤ 8: at most 4140 partitions).

  TAG's network selection also allows a task in several groups (each task served by its best
  one); here the groups are a partition, the choice a training run can follow directly (one
  network per group, every task trained once). Ties go to the first partition found (tasks
  in index order).
  """
  a = np.asarray(affinity, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"affinity: got shape {a.shape}; expected a square (T, T) matrix")
  t = a.shape[0]
  if not 1 <= t <= MAX_GROUPING_TASKS:
    raise ValueError(f"affinity: got {t} tasks; the exhaustive search takes 1 to "
                     f"{MAX_GROUPING_TASKS}")
  if not np.all(np.isfinite(a)):
    raise ValueError("affinity: has non-finite entries")
  if not (isinstance(num_groups, int) and 1 <= num_groups <= t):
    raise ValueError(f"num_groups: got {num_groups!r}; expected an int from 1 to {t} "
                     "(the number of tasks)")
  best, best_score = None, -np.inf
  for part in _partitions(list(range(t)), num_groups):
    score = grouping_score(a, part)
    if score > best_score + 1e-12:
      best, best_score = part, score
  groups = tuple(sorted(tuple(sorted(g)) for g in best))
  return groups, best_score


def task_loss_fn(model, tasks, params, batch_stats, batch, shared_of: Callable):
  """``loss_of_shared(shared) -> (T,)``: the task losses of ``model`` on ``batch`` in train
  mode (batch statistics of the batch, their updates dropped) with the shared parameters
  replaced; ``shared_of`` splits the parameters (``(shared, rest, merge)``)."""
  from mtjax.tasks import loss_and_parts

  _, rest, merge = shared_of(params)

  def loss_of_shared(shared):
    variables = {"params": merge(shared, rest), "batch_stats": batch_stats}
    outputs, _ = model.apply(variables, batch["image"], True, mutable=["batch_stats"])
    return jnp.stack([loss_and_parts(task, outputs[name], batch)[0]
                      for name, task in tasks.items()])

  return loss_of_shared


def mean_matrix(records, key: str):
  """The mean of the (T, T) ``key`` over log records that have it, and how many there were."""
  mats = [np.asarray(r[key], np.float64) for r in records if key in r]
  if not mats:
    return None, 0
  return np.mean(mats, axis=0), len(mats)


def run_affinity(workdir: str) -> tuple[tuple[str, ...], np.ndarray, int]:
  """``(task names, affinity (T, T), how many steps it averages)`` of a run's workdir: from
  ``results.json`` (a finished run), else averaged over ``metrics.jsonl``. Raises ValueError
  when the run logged no affinity."""
  import json
  import os

  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      rel = json.load(f).get("relations", {})
    if "affinity" in rel:
      return tuple(rel["tasks"]), np.asarray(rel["affinity"]), rel["affinity_count"]
  log = os.path.join(workdir, "metrics.jsonl")
  config = os.path.join(workdir, "config.json")
  if os.path.exists(log) and os.path.exists(config):
    with open(config) as f:
      names = tuple(json.load(f)["tasks"])
    with open(log) as f:
      records = [json.loads(line) for line in f if line.strip()]
    mean, count = mean_matrix(records, "affinity")
    if count:
      return names, mean, count
  raise ValueError(f"--workdir: {workdir!r} holds no inter-task affinity (results.json or "
                   "metrics.jsonl of a run trained with --config.relations.affinity_every=K)")


def format_grouping(names, affinity, groups, score) -> str:
  """The affinity matrix and the chosen groups as Markdown."""
  lines = ["| from \\ onto | " + " | ".join(names) + " |",
           "|---" * (len(names) + 1) + "|"]
  for i, name in enumerate(names):
    lines.append(f"| {name} | " + " | ".join(f"{affinity[i, j]:+.3g}"
                                             for j in range(len(names))) + " |")
  lines.append("")
  lines.append(f"{len(groups)} group(s), total inter-task affinity {score:+.4g}:")
  for g in groups:
    lines.append("- " + ", ".join(names[i] for i in g))
  return "\n".join(lines)
