"""Image-level label tasks of catalog datasets: one binary attribute, or one class of several.

* ``binary`` (CelebA's 40 attributes as 40 tasks, Sener & Koltun 2018 §5): column ``index``
  of the batch's ``attributes`` (B, num_attributes) in {0, 1}; sigmoid cross-entropy; accuracy.
* ``category`` (MultiMNIST's left and right digit): the batch key named like the task, int32
  (B,) class ids; softmax cross-entropy; accuracy.

A dataset names these tasks itself (``DatasetSpec.tasks``: ``{"attr_smiling": {"kind":
"binary", "index": 31, "num_attributes": 40}}``), so they are built by kind, not by name.
"""

import jax.numpy as jnp
import optax

from mtjax.models.heads import ClassificationHead
from mtjax.tasks.base import Task, example_mask, masked_mean, needs_classes


def binary(name: str, index: int, num_attributes: int) -> Task:
  """Attribute ``index`` of ``attributes`` as a binary task called ``name``."""
  if not 0 <= index < num_attributes:
    raise ValueError(f"task {name!r}: index {index} outside [0, {num_attributes})")

  def target(batch):
    return jnp.asarray(batch["attributes"], jnp.float32)[:, index]

  def loss_fn(logits, batch):
    y = target(batch)
    return masked_mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], y),
                       example_mask(batch, name, y.shape[0]))

  def metrics_fn(logits, batch):
    y = target(batch)
    mask = example_mask(batch, name, y.shape[0])
    correct = ((logits[:, 0] > 0) == (y > 0.5)).astype(jnp.float32)
    return {"accuracy": (jnp.sum(correct * mask), jnp.sum(mask))}

  return Task(
      name=name, head=lambda **kw: ClassificationHead(1, **kw), loss_fn=loss_fn,
      metrics_fn=metrics_fn, predict_fn=lambda logits: logits[:, 0] > 0,
      label_spec=lambda size: {"attributes": ((num_attributes,), jnp.float32)},
      higher_is_better={"accuracy": True})


def category(name: str, num_classes: int) -> Task:
  """Batch key ``name`` (int32 class ids) as a ``num_classes``-way task called ``name``."""
  num_classes = needs_classes(name, num_classes)

  def loss_fn(logits, batch):
    y = batch[name]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return masked_mean(losses, example_mask(batch, name, y.shape[0]))

  def metrics_fn(logits, batch):
    y = batch[name]
    mask = example_mask(batch, name, y.shape[0])
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return {"accuracy": (jnp.sum(correct * mask), jnp.sum(mask))}

  return Task(
      name=name, head=lambda **kw: ClassificationHead(num_classes, **kw), loss_fn=loss_fn,
      metrics_fn=metrics_fn, predict_fn=lambda logits: jnp.argmax(logits, axis=-1),
      label_spec=lambda size: {name: ((), jnp.int32)},
      higher_is_better={"accuracy": True})


KINDS = {"binary": binary, "category": category}
