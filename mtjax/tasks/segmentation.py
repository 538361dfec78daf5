"""Semantic segmentation: pixel-wise cross-entropy with an ignore label; mIoU, pixel accuracy."""

import functools

import jax
import jax.numpy as jnp
import optax

from mtjax.models.heads import DenseHead
from mtjax.tasks.base import Task, example_mask, masked_mean, needs_classes

IGNORE_LABEL = 255


def _valid(batch, ignore_label):
  labels = batch["segmentation"]
  labelled = example_mask(batch, "segmentation", labels.shape[0])[:, None, None]
  return (labels != ignore_label).astype(jnp.float32) * labelled


def loss_fn(logits, batch, *, ignore_label=IGNORE_LABEL):
  """Mean cross-entropy over labelled pixels (label != ignore_label) of labelled examples."""
  labels = batch["segmentation"]
  valid = _valid(batch, ignore_label)
  safe_labels = jnp.where(labels == ignore_label, 0, labels)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  return masked_mean(losses, valid)


def metrics_fn(logits, batch, *, ignore_label=IGNORE_LABEL):
  """Per-class intersection/union (mIoU, averaged over classes seen) and pixel accuracy."""
  labels = batch["segmentation"]
  num_classes = logits.shape[-1]
  valid = _valid(batch, ignore_label)
  pred = jnp.argmax(logits, axis=-1)
  pred_1h = jax.nn.one_hot(pred, num_classes) * valid[..., None]
  label_1h = jax.nn.one_hot(labels, num_classes) * valid[..., None]  # ignore label -> zeros
  inter = jnp.sum(pred_1h * label_1h, axis=(0, 1, 2))
  union = jnp.sum(pred_1h, axis=(0, 1, 2)) + jnp.sum(label_1h, axis=(0, 1, 2)) - inter
  correct = jnp.sum((pred == labels) * valid)
  return {"miou": (inter, union), "pixel_acc": (correct, jnp.sum(valid))}


def predict_fn(logits):
  return jnp.argmax(logits, axis=-1)


def task(num_classes: int | None = None, ignore_label: int = IGNORE_LABEL) -> Task:
  """``num_classes`` (background included) sets the head's width; losses read it from the logits."""
  return Task(
      name="segmentation",
      head=lambda **kw: DenseHead(needs_classes("segmentation", num_classes), **kw),
      loss_fn=functools.partial(loss_fn, ignore_label=ignore_label),
      metrics_fn=functools.partial(metrics_fn, ignore_label=ignore_label),
      predict_fn=predict_fn,
      label_spec=lambda size: {"segmentation": (tuple(size), jnp.int32)},
      higher_is_better={"miou": True, "pixel_acc": True},
  )
