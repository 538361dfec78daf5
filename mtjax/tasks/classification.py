"""Multi-label classification: sigmoid cross-entropy; per-label and exact-match accuracy."""

import jax.numpy as jnp
import optax

from mtjax.tasks.base import Task, example_mask, masked_mean


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


def task() -> Task:
  return Task(
      name="classification",
      head="classification",
      loss_fn=loss_fn,
      metrics_fn=metrics_fn,
      predict_fn=predict_fn,
      label_keys=("labels",),
      higher_is_better={"accuracy": True, "exact_match": True},
  )
