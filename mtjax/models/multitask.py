"""Hard parameter sharing (Caruana, 1997): one shared backbone, one head per task.

``model.apply(variables, images, train=..., mutable=[...])`` returns
``{"features": shared_features, task: task_output, ...}``. The two halves are also methods,
``encode`` (images to shared features) and ``decode`` (features to one task's output), so that
the train step can differentiate with respect to the shared features (representation-level
gradient methods) and back-propagate each task only through its own head.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from mtjax.models import backbones, heads

SHARED = "backbone"


def head_scope(task: str) -> str:
  """The name of ``task``'s head in the parameter tree."""
  return f"heads_{task}"


class MultiTaskModel(nn.Module):
  """A backbone shared by all tasks and one head per task."""

  backbone: nn.Module
  heads: Mapping[str, nn.Module]

  def encode(self, images, train: bool = False):
    """Shared features of ``images`` (B, H, W, 3)."""
    return self.backbone(images, train)

  def decode(self, features, task: str, output_size, train: bool = False):
    """``task``'s output from the shared ``features``, at ``output_size`` (H, W)."""
    return self.heads[task](features, tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    outputs = {task: self.decode(features, task, images.shape[1:3], train) for task in self.heads}
    return {"features": features, **outputs}


def build(backbone: str, task_heads: Mapping[str, tuple[str, int]], *, width: int = 64,
          output_stride: int = 32, stem: str = "imagenet", head_hidden: int = 64,
          dtype: str = "float32") -> MultiTaskModel:
  """A hard-sharing model; ``task_heads`` maps each task to (head kind, output channels)."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
  compute_dtype = jnp.dtype(dtype)
  trunk = backbones.get(backbone, width=width, output_stride=output_stride, stem=stem,
                        dtype=compute_dtype)
  task_modules = {
      task: heads.HEADS[kind](channels, hidden=head_hidden, dtype=compute_dtype)
      for task, (kind, channels) in task_heads.items()
  }
  return MultiTaskModel(trunk, task_modules)


def split_params(params, task_names):
  """``(shared, {task: head_params})`` of a hard-sharing parameter tree."""
  return params[SHARED], {task: params[head_scope(task)] for task in task_names}


def merge_params(shared, task_params):
  """The inverse of :func:`split_params`."""
  return {SHARED: shared, **{head_scope(task): p for task, p in task_params.items()}}
