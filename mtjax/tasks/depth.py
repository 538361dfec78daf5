"""Depth estimation: L1 on valid pixels; absolute and relative error (Liu et al., 2019, MTAN)."""

import jax.numpy as jnp
import numpy as np

from mtjax.models.heads import DenseHead
from mtjax.tasks.base import Task, example_mask, masked_mean


def _valid(batch):
  depth = batch["depth"]
  valid = batch["depth_valid"] if "depth_valid" in batch else depth > 0
  return valid.astype(jnp.float32) * example_mask(batch, "depth", depth.shape[0])[:, None, None]


def loss_fn(output, batch):
  """Mean absolute error over valid pixels."""
  return masked_mean(jnp.abs(output[..., 0] - batch["depth"]), _valid(batch))


def metrics_fn(output, batch):
  depth, valid = batch["depth"], _valid(batch)
  err = jnp.abs(output[..., 0] - depth) * valid
  rel = err / jnp.where(valid > 0, depth, 1.0)
  count = jnp.sum(valid)
  return {"abs_err": (jnp.sum(err), count), "rel_err": (jnp.sum(rel), count)}


def scale_crop(labels, *, scale, **_):
  """Depth under a scale-crop by ``scale``: divided by it, the scene seen ``scale`` times
  closer (MTAN / LibMTL's RandomScaleCrop)."""
  depth = labels["depth"]
  return {"depth": (depth / np.float32(scale)).astype(depth.dtype)}


def predict_fn(output):
  return output[..., 0]


def task() -> Task:
  return Task(
      name="depth",
      augment={"scale_crop": scale_crop},
      head=lambda **kw: DenseHead(1, **kw),
      loss_fn=loss_fn,
      metrics_fn=metrics_fn,
      predict_fn=predict_fn,
      label_spec=lambda size: {"depth": (tuple(size), jnp.float32),
                               "depth_valid": (tuple(size), jnp.bool_)},
      higher_is_better={"abs_err": False, "rel_err": False},
  )
