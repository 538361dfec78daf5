"""ResNet backbones (He et al., 2016) for dense prediction, in Flax Linen.

Output stride 8 or 16 replaces the strides of the last stages by dilation (Chen et al., 2017,
DeepLab), as dense multi-task models do. With the ImageNet stem the trunk is torchvision's ResNet
exactly, dilation included: ``replace_stride_with_dilation`` (torchvision's ``_make_layer``) and
LibMTL's ``resnet_dilated`` (``_nostride_dilate``) give the first block of a dilated stage the
*previous* dilation and its other blocks the new one. The small-image stems keep mtjax's own
rule, every block of a dilated stage at the new dilation (the default experiment's model).
The stem is the ImageNet one (7×7/2 conv and 3×3/2 max pool, stride 4) or, for small images, a
single 3×3 conv of stride 2 (``"small"``) or 1 (``"cifar"``).
"""

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp


def _conv_and_norm(dtype, train: bool):
  """Bias-free convolutions and BatchNorm (momentum 0.9) in ``dtype``, as the blocks use them."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  """Two 3×3 convolutions with an identity or 1×1 projection shortcut (ResNet-18/34)."""

  filters: int
  strides: int = 1
  dilation: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = _conv_and_norm(self.dtype, train)
    residual = x
    y = conv(self.filters, (3, 3), self.strides, padding=self.dilation,
             kernel_dilation=self.dilation)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3), padding=self.dilation, kernel_dilation=self.dilation)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = norm()(conv(self.filters, (1, 1), self.strides)(residual))
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1×1, 3×3, 1×1 convolutions with 4× expansion (ResNet-50 and deeper)."""

  filters: int
  strides: int = 1
  dilation: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv, norm = _conv_and_norm(self.dtype, train)
    residual = x
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = conv(self.filters, (3, 3), self.strides, padding=self.dilation,
             kernel_dilation=self.dilation)(y)
    y = nn.relu(norm()(y))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
    if residual.shape != y.shape:
      residual = norm()(conv(self.filters * 4, (1, 1), self.strides)(residual))
    return nn.relu(residual + y)


class Plan(NamedTuple):
  """How a :class:`ResNet` runs, stage by stage: what its pieces (:class:`Stages`) are built from.

  ``stages[i - 1]`` holds stage ``i``'s blocks as ``(filters, strides, dilation)``: the strides
  of the first block of stages 2..N, turned into dilation once the stride reaches
  ``output_stride`` (:func:`plan_of`; the first block of such a stage keeps the previous
  dilation with the ImageNet stem, as torchvision does).
  """

  stem: str
  width: int
  block: str
  stages: tuple
  dtype: jnp.dtype


def plan_of(resnet: "ResNet") -> Plan:
  """The :class:`Plan` of ``resnet``: the one place its strides and dilations are worked out."""
  stride = {"imagenet": 4, "small": 2}.get(resnet.stem, 1)
  # torchvision's _make_layer(dilate=True): the first block gets `previous_dilation`.
  keep_previous = resnet.stem == "imagenet"
  dilation, stages = 1, []
  for i, num_blocks in enumerate(resnet.stage_sizes):
    blocks = []
    for j in range(num_blocks):
      strides, block_dilation = (2 if i > 0 and j == 0 else 1), dilation
      if strides == 2 and stride >= resnet.output_stride:
        strides, dilation = 1, dilation * 2
        block_dilation = block_dilation if keep_previous else dilation
      elif strides == 2:
        stride *= 2
      blocks.append((resnet.width * 2**i, strides, block_dilation))
    stages.append(tuple(blocks))
  return Plan(resnet.stem, resnet.width, resnet.block, tuple(stages), resnet.dtype)


def stage_channels(plan: Plan) -> tuple:
  """``(C_0, C_1, ..., C_N)``: the channels of the stem's (``C_0``) and each stage's output."""
  expansion = 4 if plan.block == "bottleneck" else 1
  return (plan.width, *(stage[-1][0] * expansion for stage in plan.stages))


def run_stages(plan: Plan, x, train: bool, first: int, last: int) -> dict:
  """Stages ``first``..``last`` of ``plan`` on ``x`` (0: the stem, on images): ``{"stem": ...,
  "stage<i>": ...}`` of those it ran.

  The one ResNet stage runner (:class:`ResNet` and :class:`Stages` call it). Call it inside a
  ``@nn.compact`` method: its layers become the caller's submodules, named in order of creation
  (``Conv_0``/``BatchNorm_0`` for the stem, ``BasicBlock_<k>`` or ``BottleneckBlock_<k>`` with
  ``k`` counted from 0 in the caller).
  """
  conv, norm = _conv_and_norm(plan.dtype, train)
  out = {}
  if first == 0:
    x = x.astype(plan.dtype)
    if plan.stem == "imagenet":
      x = nn.relu(norm()(conv(plan.width, (7, 7), 2, padding=3)(x)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:  # "small" (3×3/2 conv) or "cifar" (3×3/1 conv)
      stride = 2 if plan.stem == "small" else 1
      x = nn.relu(norm()(conv(plan.width, (3, 3), stride, padding=1)(x)))
    out["stem"] = x
  block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[plan.block]
  for i in range(max(first, 1), last + 1):
    for filters, strides, dilation in plan.stages[i - 1]:
      x = block_cls(filters, strides, dilation, plan.dtype)(x, train)
    out[f"stage{i}"] = x
  return out


def _group(stage_sizes, first: int, name: str) -> str:
  """``"stem"`` or ``"stage<i>"``: the stage of the top-level variable ``name`` of a module
  that ran stages ``first``..N (its blocks numbered from 0)."""
  if "Block_" not in name:  # the stem's Conv_0 / BatchNorm_0
    return "stem"
  index = int(name.rsplit("_", 1)[1])
  for i, end in enumerate(itertools.accumulate(stage_sizes[max(first, 1) - 1:])):
    if index < end:
      return f"stage{max(first, 1) + i}"
  raise ValueError(f"parameter {name}: block {index} is past the last stage")


class ResNet(nn.Module):
  """A ResNet trunk returning every stage: ``{"stem": ..., "stage1": ..., ..., "stageN": ...}``.

  Each entry is a feature map ``(B, H/s, W/s, C)``; the last one has stride ``output_stride``.
  A multi-task model picks the stages it needs (hard sharing: the last, :func:`last_stage`), or
  runs pieces of it on their own (:class:`Stages`).
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  output_stride: int = 32
  stem: str = "imagenet"
  dtype: jnp.dtype = jnp.float32
  # Frozen BatchNorm (e.g. of a pretrained backbone, as detectors use it): the running
  # statistics normalise in training too and are not updated; the BN parameters get their own
  # group "bn/<stage>" (the loop freezes "shared/bn").
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, images, train: bool):
    train = train and not self.frozen_bn  # the blocks use `train` for BatchNorm only
    return run_stages(plan_of(self), images, train, 0, len(self.stage_sizes))

  def param_group(self, path) -> str:
    """``"stem"`` or ``"stage<i>"``: the part of the trunk a parameter path (in it) belongs to
    (with ``frozen_bn``, a BatchNorm's is ``"bn/stem"``, ``"bn/stage<i>"``)."""
    group = _group(tuple(self.stage_sizes), 0, path[0])
    if self.frozen_bn and any(str(p).startswith("BatchNorm") for p in path):
      return "bn/" + group
    return group


class Stages(nn.Module):
  """Stages ``first``..``last`` of a ResNet as a module of their own (``first = 0``: from the
  stem, on images), run by :func:`run_stages` as :class:`ResNet` runs them; returns stage
  ``last``'s output (the stem's if ``last = 0``).

  What partial sharing, cross-stitch, LTB and the expert architectures copy per task or per
  expert. Blocks are numbered from 0 in each piece: a piece from the stem (``first = 0``) has
  the parameter names of the same stages of :class:`ResNet`.
  """

  plan: Plan
  first: int
  last: int

  @nn.compact
  def __call__(self, x, train: bool):
    out = run_stages(self.plan, x, train, self.first, self.last)
    return out["stem" if self.last == 0 else f"stage{self.last}"]

  def param_group(self, path) -> str:
    """``"stem"`` or ``"stage<i>"`` (the ResNet's stage numbers), as :meth:`ResNet.param_group`."""
    return _group(tuple(len(s) for s in self.plan.stages), self.first, path[0])


def part(resnet: ResNet, first: int, last: int) -> Stages:
  """Stages ``first``..``last`` of ``resnet`` (0: the stem) as a module of their own."""
  return Stages(plan_of(resnet), first, last)


def last_stage(stages):
  """The deepest feature map of a backbone's ``{"stem", "stage1", ...}`` output.

  By number, not by order: a dict that went through a JAX transformation has sorted keys.
  """
  return stages[max((k for k in stages if k.startswith("stage")), key=lambda k: int(k[5:]))]


def deepest_stages(stages, count: int) -> dict:
  """The ``count`` deepest ``"stage<i>"`` entries of a backbone's output (all if it has fewer)."""
  names = sorted((k for k in stages if k.startswith("stage")), key=lambda k: int(k[5:]))
  return {name: stages[name] for name in names[-count:]}


STEMS = ("imagenet", "small", "cifar")
STAGES = {
    "resnet_tiny": ((1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}


def names() -> list[str]:
  """The backbone names."""
  return sorted(STAGES)


def get(name: str, *, width: int = 64, output_stride: int = 32, stem: str = "imagenet",
        dtype=jnp.float32, frozen_bn: bool = False) -> ResNet:
  """The backbone ``name`` (see :func:`names`)."""
  if name not in STAGES:
    raise ValueError(f"model.backbone: unknown backbone {name!r}; valid names: {names()}")
  if output_stride not in (1, 2, 4, 8, 16, 32):
    raise ValueError(
        f"model.output_stride: expected one of 1, 2, 4, 8, 16, 32, got {output_stride}")
  if stem not in STEMS:
    raise ValueError(f"model.stem: expected one of {STEMS}, got {stem!r}")
  stages, block = STAGES[name]
  return ResNet(stages, block, width, output_stride, stem, dtype, bool(frozen_bn))
