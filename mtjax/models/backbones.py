"""ResNet backbones (He et al., 2016) for dense prediction, in Flax Linen.

Output stride 8 or 16 replaces the strides of the last stages by dilation (Chen et al., 2017,
DeepLab), as dense multi-task models do. The stem is the ImageNet one (7×7/2 conv and 3×3/2 max
pool, stride 4) or, for small images, a single 3×3 conv of stride 2 (``"small"``) or 1
(``"cifar"``).
"""

import dataclasses
import functools
import itertools
from collections.abc import Sequence

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


class ResNet(nn.Module):
  """A ResNet trunk returning every stage: ``{"stem": ..., "stage1": ..., ..., "stageN": ...}``.

  Each entry is a feature map ``(B, H/s, W/s, C)``; the last one has stride ``output_stride``.
  A multi-task model picks the stages it needs (hard sharing: the last, :func:`last_stage`).
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
    block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
    conv, norm = _conv_and_norm(self.dtype, train)
    x = images.astype(self.dtype)
    if self.stem == "imagenet":
      x = nn.relu(norm()(conv(self.width, (7, 7), 2, padding=3)(x)))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
      stride = 4
    else:  # "small" (3×3/2 conv) or "cifar" (3×3/1 conv)
      stride = 2 if self.stem == "small" else 1
      x = nn.relu(norm()(conv(self.width, (3, 3), stride, padding=1)(x)))
    stages = {"stem": x}
    dilation = 1
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        if strides == 2 and stride >= self.output_stride:
          strides, dilation = 1, dilation * 2
        elif strides == 2:
          stride *= 2
        x = block_cls(self.width * 2**i, strides, dilation, self.dtype)(x, train)
      stages[f"stage{i + 1}"] = x
    return stages

  def param_group(self, path) -> str:
    """``"stem"`` or ``"stage<i>"``: the part of the trunk a parameter path (in it) belongs to
    (with ``frozen_bn``, a BatchNorm's is ``"bn/stem"``, ``"bn/stage<i>"``)."""
    if self.frozen_bn and any(str(p).startswith("BatchNorm") for p in path):
      return "bn/" + dataclasses.replace(self, frozen_bn=False).param_group(path)
    name = path[0]  # the stem's Conv_0 / BatchNorm_0, or BasicBlock_<k> / BottleneckBlock_<k>
    if "Block_" not in name:
      return "stem"
    index = int(name.rsplit("_", 1)[1])
    for i, end in enumerate(itertools.accumulate(self.stage_sizes)):
      if index < end:
        return f"stage{i + 1}"
    raise ValueError(f"parameter path {path}: block {index} is past the last stage")


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
