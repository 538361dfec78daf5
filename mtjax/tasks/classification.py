"""Multi-label classification: sigmoid cross-entropy; per-label and exact-match accuracy."""

import jax.numpy as jnp
import optax

from mtjax.models.heads import ClassificationHead
from mtjax.tasks.base import Task, example_mask, masked_mean, needs_classes


def loss_fn(logits, batch):
  """Mean sigmoid binary cross-entropy over labels and labelled examples."""
  labels = batch["labels"]
  mask = example_mask(batch, "classification", labels.shape[0])[:, None]
  return masked_mean(optax.sigmoid_binary_cross_entropy(logits, labels), mask)


def metrics_fn(logits, batch):
  labels = batch["labels"]
  mask = example_mask(batch, "classification", labels.shape[0])
  correct = ((logits > 0) == (labels > 0.5)).astype(jnp.float32)
  return {
      "accuracy": (jnp.sum(correct * mask[:, None]), jnp.sum(mask) * labels.shape[-1]),
      "exact_match": (jnp.sum(jnp.all(correct > 0, axis=-1) * mask), jnp.sum(mask)),
  }


def predict_fn(logits):
  return logits > 0


def task(num_classes: int | None = None) -> Task:
  """``num_classes``: the number of binary labels (the head's width)."""
  return Task(
      name="classification",
      head=lambda **kw: ClassificationHead(needs_classes("classification", num_classes), **kw),
      loss_fn=loss_fn,
      metrics_fn=metrics_fn,
      predict_fn=predict_fn,
      label_spec=lambda size: {"labels": ((needs_classes("classification", num_classes),),
                                          jnp.float32)},
      higher_is_better={"accuracy": True, "exact_match": True},
  )
