"""Hard parameter sharing (Caruana, 1997): one shared backbone, one head per task.

The multi-task model contract (every architecture follows it):

- ``model.apply(variables, images, train=..., mutable=[...])`` returns
  ``{"features": features, task: task_output, ...}``;
- ``encode(images, train) -> features``, any pytree (here the backbone's last stage, or a dict
  of its deepest stages when a head reads several, see :class:`MultiTaskModel`), and
  ``decode(features, task, output_size, train) -> output``: the train step differentiates with
  respect to the features (representation-level methods) and back-propagates each task through
  its own parameters only. ``encode`` uses only the parameters labelled ``"shared"``, ``decode``
  only those of its task. A model with no shared encoder defines neither; the train step then
  differentiates the loss vector with respect to everything labelled shared (the general path);
- ``param_label(path) -> "shared[/group]"`` or ``"<task>[/group]"`` for every variable path
  (see :mod:`mtjax.models.labels`).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from mtjax.models import backbones, labels
from mtjax.models import heads as heads_lib

# torchvision's ImageNet statistics of RGB images in [0, 1] (torchvision.transforms.Normalize
# in its reference training scripts): what its pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("none", "imagenet")


def normalize(images, input_norm: str):
  """``images`` as the backbone sees them: unchanged (``"none"``: LibMTL's NYUv2/Cityscapes
  examples feed the stored [0, 1] images as they are), or ``(x - mean) / std`` with torchvision's
  ImageNet statistics (``"imagenet"``)."""
  if input_norm == "none":
    return images
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (images - mean) / std

# The collection a model sows auxiliary losses into: ``self.sow(AUX_LOSSES, name, value)`` from
# ``__call__``, ``encode`` or ``decode`` in a training pass. They are not tasks: the train step
# adds ``Σ_name value`` to the objective after the task weighting (its gradient is added to the
# balanced one, whatever the method) and logs each as ``loss/aux/<name>``
# (:func:`mtjax.train.step.task_terms`). Values sown under one name in one pass are added.
AUX_LOSSES = "aux_losses"


class DeepSupervision(NamedTuple):
  """A decoded output with intermediate outputs that are supervised too (e.g. PAD-Net).

  The train step's loss of the task is ``L(output) + weight · Σ_i L(intermediate[i])``, with
  the second term logged as the loss part ``"intermediate"``; metrics and predictions see
  ``output`` (:func:`mtjax.train.step.output_loss`).
  """

  output: Any
  intermediate: tuple
  weight: float = 1.0


class MultiTaskModel(nn.Module):
  """A backbone shared by all tasks and one head per task.

  A head reads the backbone's last stage (one array) unless it declares ``feature_stages = n
  > 1`` (a multi-scale head, e.g. FCOS on a feature pyramid): then ``encode`` returns the dict
  ``{"stage<i>": ...}`` of the ``n`` deepest stages (the largest ``n`` any head asks for) and
  ``decode`` hands that dict to such heads and its last stage to the others. With only
  single-stage heads the features are the last stage, as before.
  """

  backbone: nn.Module
  heads: Mapping[str, nn.Module]
  input_norm: str = "none"  # see normalize(): applied once, first thing in encode

  def feature_stages(self) -> int:
    """How many of the deepest backbone stages ``encode`` returns (1: one array)."""
    return max((_stages_of(head) for head in self.heads.values()), default=1)

  def encode(self, images, train: bool = False):
    """Shared features of ``images`` (B, H, W, 3): the backbone's last stage, or a dict of its
    deepest stages when a head reads several."""
    stages = self.backbone(normalize(images, self.input_norm), train)
    count = self.feature_stages()
    return backbones.last_stage(stages) if count == 1 else backbones.deepest_stages(stages, count)

  def decode(self, features, task: str, output_size, train: bool = False):
    """``task``'s output from the shared ``features``, at ``output_size`` (H, W)."""
    head = self.heads[task]
    if isinstance(features, Mapping) and _stages_of(head) == 1:
      features = backbones.last_stage(features)
    return head(features, tuple(output_size), train)

  def __call__(self, images, train: bool = False):
    features = self.encode(images, train)
    outputs = {task: self.decode(features, task, images.shape[1:3], train) for task in self.heads}
    return {"features": features, **outputs}

  def param_label(self, path) -> str:
    """``"shared/stem"``, ``"shared/stage<i>"`` for the backbone; the task name for a head."""
    return labels.from_table(labels.heads_table(self.heads), path, "hard-sharing",
                             trunk=("backbone", self.backbone))


def _stages_of(head) -> int:
  return int(getattr(head, "feature_stages", 1))


class Common(NamedTuple):
  """The ``config.model`` fields every architecture's builder takes, besides the backbone's
  name and the tasks, with ``config.model``'s defaults: the backbone's ``width`` (channels of
  its first stage), ``output_stride``, ``stem`` (``"imagenet"`` or ``"small"``), the heads'
  ``head_hidden`` channels and the compute ``dtype`` (``"float32"`` or ``"bfloat16"``)."""

  width: int = 64
  output_stride: int = 32
  stem: str = "imagenet"
  head_hidden: int = 64
  dtype: str = "float32"


def backbone_and_heads(backbone: str, tasks: Mapping, common: Common, *,
                       frozen_bn: bool = False):
  """``(trunk, heads, compute dtype)``: the checked backbone and each task's own head.

  What every architecture's builder starts from (the common ``config.model`` fields).
  """
  if common.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype: expected 'float32' or 'bfloat16', got {common.dtype!r}")
  compute_dtype = jnp.dtype(common.dtype)
  trunk = backbones.get(backbone, width=common.width, output_stride=common.output_stride,
                        stem=common.stem, dtype=compute_dtype, frozen_bn=frozen_bn)
  heads = {name: task.head(hidden=common.head_hidden, dtype=compute_dtype)
           for name, task in tasks.items()}
  return trunk, heads, compute_dtype


def deeplab_heads(task_heads: Mapping, *, hidden: int, dtype) -> dict:
  """A :class:`mtjax.models.heads.DeepLabHead` (``hidden`` channels) in place of each task's
  dense head, with that head's output channels; raises ValueError naming ``model.head`` for a
  task whose head is not dense (classification, detection)."""
  out = {}
  for name, head in task_heads.items():
    if not isinstance(head, heads_lib.DenseHead):
      raise ValueError(f"model.head: 'deeplab' replaces dense per-pixel heads; task {name!r} "
                       f"has a {type(head).__name__}")
    out[name] = heads_lib.DeepLabHead(head.out_channels, hidden=hidden, dtype=dtype)
  return out


def build(backbone: str, tasks: Mapping, common: Common, *, frozen_bn: bool = False,
          head: str = "task", input_norm: str = "none") -> MultiTaskModel:
  """A hard-sharing model: backbone ``backbone`` and each task's own head (``task.head``).

  ``frozen_bn``: the backbone's BatchNorm uses its running statistics in training too, and its
  parameters are the ``shared/bn`` group (frozen by the loop; a pretrained backbone).
  ``head``: ``"task"`` (each task's own head) or ``"deeplab"`` (DeepLabV3's ASPP head of
  ``head_hidden`` channels for every dense task, LibMTL's NYUv2/Cityscapes model).
  ``input_norm``: ``"none"`` or ``"imagenet"`` (:func:`normalize`, inside the model).
  Parameters: ``P_backbone + Σ_t P_head_t``.
  """
  if head not in heads_lib.HEADS:
    raise ValueError(f"model.head: expected one of {heads_lib.HEADS}, got {head!r}")
  if input_norm not in INPUT_NORMS:
    raise ValueError(f"model.input_norm: expected one of {INPUT_NORMS}, got {input_norm!r}")
  trunk, heads, compute_dtype = backbone_and_heads(backbone, tasks, common, frozen_bn=frozen_bn)
  if head == "deeplab":
    heads = deeplab_heads(heads, hidden=common.head_hidden, dtype=compute_dtype)
  return MultiTaskModel(trunk, heads, input_norm)
