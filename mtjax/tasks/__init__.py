"""Tasks: a plain-dict registry of loss, metric and prediction functions.

    task = mtjax.tasks.get("segmentation", num_classes=5)
    loss = task.loss_fn(outputs["segmentation"], batch)
"""

from mtjax.tasks import classification, depth, normals, segmentation
from mtjax.tasks.base import Task, summarize

_REGISTRY = {
    "segmentation": segmentation.task,
    "depth": depth.task,
    "normals": normals.task,
    "classification": classification.task,
}

# Output channels of each task's head, given the dataset's number of (foreground) classes.
_CHANNELS = {
    "segmentation": lambda num_classes: num_classes,
    "depth": lambda num_classes: 1,
    "normals": lambda num_classes: 3,
    "classification": lambda num_classes: num_classes - 1,
}


def names() -> list[str]:
  """The registered task names, sorted."""
  return sorted(_REGISTRY)


def get(name: str, num_classes: int = 0) -> Task:
  """The task ``name``; ``num_classes`` counts segmentation classes, background included."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; valid names: {names()}")
  if name == "segmentation":
    return _REGISTRY[name](num_classes)
  return _REGISTRY[name]()


def head_channels(name: str, num_classes: int) -> int:
  """Output channels of the head of task ``name``."""
  get(name)
  return _CHANNELS[name](num_classes)


__all__ = ["Task", "get", "head_channels", "names", "summarize"]
