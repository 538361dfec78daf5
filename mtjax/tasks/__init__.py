"""Tasks: a plain-dict registry of task factories; each task owns its head, labels and losses.

    task = mtjax.tasks.get("segmentation", num_classes=5)
    loss = task.loss_fn(outputs["segmentation"], batch)

A task's options (e.g. its class count) come from the dataset's per-task info
(``mtjax.data.dataset_info(name)["tasks"][task]``).
"""

import inspect

from mtjax.tasks import classification, depth, detection, labels, normals, segmentation
from mtjax.tasks.base import Evaluator, Task, check_batch, label_keys, loss_and_parts, summarize

_REGISTRY = {
    "segmentation": segmentation.task,
    "depth": depth.task,
    "normals": normals.task,
    "classification": classification.task,
    "detection": detection.task,
}


def names() -> list[str]:
  """The registered task names, sorted."""
  return sorted(_REGISTRY)


def get(name: str, num_classes: int | None = None, **options) -> Task:
  """The task ``name`` built with its options (``num_classes`` where the task has classes).

  A dataset's own tasks (CelebA's attributes, MultiMNIST's digits) carry ``kind`` in their
  options (``mtjax.tasks.labels.KINDS``) and are built by kind under the dataset's name.
  """
  if "kind" in options and name not in _REGISTRY:
    kind = options.pop("kind")
    if kind not in labels.KINDS:
      raise ValueError(f"task {name!r}: unknown kind {kind!r}; valid: {sorted(labels.KINDS)}")
    if num_classes is not None:
      options["num_classes"] = num_classes
    return labels.KINDS[kind](name, **options)
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; valid names: {names()}")
  factory = _REGISTRY[name]
  if num_classes is not None:
    options["num_classes"] = num_classes
  allowed = set(inspect.signature(factory).parameters)
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise ValueError(f"task {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
  return factory(**options)


__all__ = ["Evaluator", "Task", "check_batch", "get", "label_keys", "loss_and_parts", "names",
           "summarize"]
