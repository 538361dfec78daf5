"""A PyTorch peer of mtjax's hard-sharing dense model, its losses and four train steps.

The same network as ``mtjax.models.build`` (a ResNet trunk with the ``imagenet``, ``small`` or
``cifar`` stem and dilation for output stride 8/16; dense heads conv3×3 + BN + ReLU, conv1×1,
bilinear upsampling), the same losses as ``mtjax.tasks`` (cross-entropy with ignore label 255,
L1 on valid depth, ``1 - cos`` on valid normals, each a mean over valid pixels), BatchNorm with
the same momentum (Flax 0.9 = PyTorch 0.1) and epsilon, SGD with momentum as ``optax.sgd``.
:func:`load_flax_variables` copies an mtjax initialisation into it, so both libraries start from
the same weights and compute the same losses on the same batch.

The train steps (:class:`Peer`), written the way PyTorch MTL libraries write them:

- ``ew``: one backward of ``Σ_t L_t``;
- ``ew_compile``: the same with forward and losses under ``torch.compile``;
- ``mgda_rep``: representation level as LibMTL's ``rep_grad=True``: one detached copy of the
  shared features per task, T backward passes through the heads only, MGDA's min-norm weights
  (Frank–Wolfe on the T×T Gram matrix, Sener & Koltun, 2018, as ``MinNormSolver``), one
  backward through the backbone of ``Σ_t w_t ∂L_t/∂z``;
- ``libmtl_pcgrad``: parameter level as LibMTL's ``AbsWeighting._compute_grad``: T
  ``torch.autograd.grad`` calls over the shared parameters (and the task's head), the gradients
  flattened into a (T, D) matrix, then LibMTL's PCGrad loop (Yu et al., 2020): each task's
  gradient projected in a random order onto the normal plane of the ones it conflicts with,
  then summed;
- ``torchjd_upgrad`` / ``torchjd_pcgrad``: torchjd's ``mtl_backward`` (the Jacobian of the losses
  with respect to the shared parameters, by ``torch.vmap`` over the backward) and ``jac_to_grad``
  with ``torchjd.aggregation.UPGrad`` / ``PCGrad``.

Heads get the gradient of their own loss in every variant, as in mtjax and LibMTL. This module
imports neither jax nor mtjax: only numpy and torch (and torchjd for its two variants).
"""

import contextlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_LABEL = 255
BN_MOMENTUM = 0.1  # PyTorch's convention: 1 - Flax's 0.9
BN_EPS = 1e-5  # Flax's and PyTorch's default
STAGES = {
    "resnet_tiny": ((1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}
VARIANTS = ("ew", "ew_compile", "mgda_rep", "libmtl_pcgrad", "torchjd_upgrad", "torchjd_pcgrad")


def _bn(channels, zero_scale=False):
  bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
  if zero_scale:
    nn.init.zeros_(bn.weight)
  return bn


class Block(nn.Module):
  """A basic (two 3×3) or bottleneck (1×1, 3×3, 1×1, ×4) residual block.

  ``convs[k]`` is followed by ``bns[k]``; the last pair (if any beyond the main path) is the
  projection shortcut. The order is that of the Flax block's ``Conv_k`` / ``BatchNorm_k``.
  """

  def __init__(self, kind, in_ch, filters, stride, dilation):
    super().__init__()
    self.kind = kind
    d = dilation
    if kind == "basic":
      out_ch = filters
      convs = [nn.Conv2d(in_ch, filters, 3, stride, padding=d, dilation=d, bias=False),
               nn.Conv2d(filters, filters, 3, 1, padding=d, dilation=d, bias=False)]
      bns = [_bn(filters), _bn(filters, zero_scale=True)]
    else:
      out_ch = 4 * filters
      convs = [nn.Conv2d(in_ch, filters, 1, bias=False),
               nn.Conv2d(filters, filters, 3, stride, padding=d, dilation=d, bias=False),
               nn.Conv2d(filters, out_ch, 1, bias=False)]
      bns = [_bn(filters), _bn(filters), _bn(out_ch, zero_scale=True)]
    self.project = stride != 1 or in_ch != out_ch
    if self.project:
      convs.append(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False))
      bns.append(_bn(out_ch))
    self.convs, self.bns = nn.ModuleList(convs), nn.ModuleList(bns)
    self.out_channels = out_ch

  def forward(self, x):
    main = len(self.convs) - (1 if self.project else 0)
    y = x
    for k in range(main):
      y = self.bns[k](self.convs[k](y))
      if k < main - 1:
        y = F.relu(y)
    residual = self.bns[main](self.convs[main](x)) if self.project else x
    return F.relu(residual + y)


class ResNet(nn.Module):
  """The trunk of ``mtjax.models.backbones.ResNet``: same stems, strides and dilations."""

  def __init__(self, name, width=64, output_stride=32, stem="imagenet"):
    super().__init__()
    stages, kind = STAGES[name]
    self.kind, self.stem = kind, stem
    stride = 2 if stem in ("imagenet", "small") else 1
    if stem == "imagenet":
      self.stem_conv = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
      stride = 4
    else:
      self.stem_conv = nn.Conv2d(3, width, 3, stride, padding=1, bias=False)
    self.stem_bn = _bn(width)
    blocks, dilation, in_ch = [], 1, width
    for i, num_blocks in enumerate(stages):
      for j in range(num_blocks):
        s, block_dilation = (2 if i > 0 and j == 0 else 1), dilation
        if s == 2 and stride >= output_stride:
          s, dilation = 1, dilation * 2
          # the ImageNet stem is torchvision's: a dilated stage's first block keeps the previous
          block_dilation = block_dilation if stem == "imagenet" else dilation
        elif s == 2:
          stride *= 2
        block = Block(kind, in_ch, width * 2**i, s, block_dilation)
        blocks.append(block)
        in_ch = block.out_channels
    self.blocks = nn.ModuleList(blocks)
    self.out_channels = in_ch

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    if self.stem == "imagenet":
      x = F.max_pool2d(x, 3, 2, padding=1)
    for block in self.blocks:
      x = block(x)
    return x


class DenseHead(nn.Module):
  """conv3×3 + BN + ReLU, conv1×1, bilinear upsampling (``mtjax.models.heads.DenseHead``)."""

  def __init__(self, in_ch, out_ch, hidden):
    super().__init__()
    self.conv0 = nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False)
    self.bn0 = _bn(hidden)
    self.conv1 = nn.Conv2d(hidden, out_ch, 1)

  def forward(self, features, size):
    x = self.conv1(F.relu(self.bn0(self.conv0(features))))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).float()


class MultiTaskNet(nn.Module):
  """One shared trunk and one dense head per task (hard parameter sharing)."""

  def __init__(self, backbone, head_channels, *, width=64, output_stride=32, stem="imagenet",
               head_hidden=64):
    super().__init__()
    self.backbone = ResNet(backbone, width, output_stride, stem)
    self.heads = nn.ModuleDict({
        t: DenseHead(self.backbone.out_channels, c, head_hidden) for t, c in head_channels.items()})

  def forward(self, images):
    features = self.backbone(images)
    return {t: head(features, images.shape[-2:]) for t, head in self.heads.items()}


# -------------------------------------------------------------------------------------------
# Losses (mtjax.tasks): means over valid pixels, max(count, 1) in the denominator.


def _masked_mean(values, valid):
  return (values * valid).sum() / valid.sum().clamp(min=1.0)


def segmentation_loss(logits, batch):
  labels = batch["segmentation"]
  valid = (labels != IGNORE_LABEL).float()
  ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="none")
  return _masked_mean(ce, valid)


def depth_loss(output, batch):
  return _masked_mean((output[:, 0] - batch["depth"]).abs(), batch["depth_valid"])


def normals_loss(output, batch):
  unit = output / output.square().sum(1, keepdim=True).clamp(min=1e-12).sqrt()
  cos = (unit * batch["normals"]).sum(1)
  return _masked_mean(1.0 - cos, batch["depth_valid"])


LOSSES = {"segmentation": segmentation_loss, "depth": depth_loss, "normals": normals_loss}


def to_torch_batch(batch, device, channels_last=False):
  """An mtjax batch (numpy, NHWC) as torch tensors (NCHW; labels int64, masks float32)."""
  image = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
  out = {
      "image": image.to(device),
      "segmentation": torch.from_numpy(batch["segmentation"].astype(np.int64)).to(device),
      "depth": torch.from_numpy(batch["depth"]).to(device),
      "depth_valid": torch.from_numpy(batch["depth_valid"].astype(np.float32)).to(device),
      "normals": torch.from_numpy(
          np.ascontiguousarray(batch["normals"].transpose(0, 3, 1, 2))).to(device),
  }
  if channels_last:
    out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
  return out


# -------------------------------------------------------------------------------------------
# mtjax (Flax) initialisation -> this model


def _set(tensor, value):
  with torch.no_grad():
    value = torch.from_numpy(np.array(value, np.float32))  # a writable copy
    if value.shape != tensor.shape:
      raise ValueError(f"shape mismatch: flax {tuple(value.shape)}, torch {tuple(tensor.shape)}")
    tensor.copy_(value)


def _load_conv(conv, p):
  _set(conv.weight, np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)))  # HWIO -> OIHW
  if conv.bias is not None:
    _set(conv.bias, p["bias"])


def _load_bn(bn, p, s):
  _set(bn.weight, p["scale"])
  _set(bn.bias, p["bias"])
  _set(bn.running_mean, s["mean"])
  _set(bn.running_var, s["var"])


def load_flax_variables(net, params, batch_stats):
  """Copies mtjax's ``params`` / ``batch_stats`` (numpy trees) into ``net`` (a MultiTaskNet).

  Flax names a block's convolutions ``Conv_k`` and its norms ``BatchNorm_k`` in the order they
  are created, which pairs ``Conv_k`` with ``BatchNorm_k`` in both block kinds.
  """
  bp, bs = params["backbone"], batch_stats["backbone"]
  _load_conv(net.backbone.stem_conv, bp["Conv_0"])
  _load_bn(net.backbone.stem_bn, bp["BatchNorm_0"], bs["BatchNorm_0"])
  prefix = "BasicBlock" if net.backbone.kind == "basic" else "BottleneckBlock"
  for i, block in enumerate(net.backbone.blocks):
    p, s = bp[f"{prefix}_{i}"], bs[f"{prefix}_{i}"]
    for k, (conv, bn) in enumerate(zip(block.convs, block.bns, strict=True)):
      _load_conv(conv, p[f"Conv_{k}"])
      _load_bn(bn, p[f"BatchNorm_{k}"], s[f"BatchNorm_{k}"])
  for task, head in net.heads.items():
    p, s = params[f"heads_{task}"], batch_stats[f"heads_{task}"]
    _load_conv(head.conv0, p["Conv_0"])
    _load_bn(head.bn0, p["BatchNorm_0"], s["BatchNorm_0"])
    _load_conv(head.conv1, p["Conv_1"])


# -------------------------------------------------------------------------------------------
# MGDA's min-norm weights and LibMTL's PCGrad


def _min_norm_2(v11, v12, v22):
  """``γ`` minimising ``|γ a + (1-γ) b|²`` from the inner products (Sener & Koltun, Alg. 1)."""
  if v12 >= v11:
    return 0.999
  if v12 >= v22:
    return 0.001
  return -(v12 - v22) / (v11 + v22 - 2 * v12)


def min_norm_weights(gram, num_iters=250, tol=1e-5):
  """Frank–Wolfe for ``argmin_{w ∈ Δ} wᵀ G w`` (``MinNormSolver.find_min_norm_element_FW``)."""
  gram = np.asarray(gram, np.float64)
  num_tasks = gram.shape[0]
  w = np.full(num_tasks, 1.0 / num_tasks)
  for _ in range(num_iters):
    gw = gram @ w
    t = int(np.argmin(gw))
    gamma = _min_norm_2(float(w @ gw), float(gw[t]), float(gram[t, t]))
    new = gamma * w
    new[t] += 1.0 - gamma
    if np.abs(new - w).sum() < tol:
      return new
    w = new
  return w


def libmtl_pcgrad(grads, rng):
  """LibMTL's ``PCGrad.backward`` on a (T, D) matrix: the sum of the projected gradients."""
  num_tasks = grads.shape[0]
  pc = grads.clone()
  sq_norms = grads.square().sum(1)
  for i in range(num_tasks):
    order = list(range(num_tasks))
    rng.shuffle(order)
    for j in order:
      if j == i:
        continue
      g_ij = torch.dot(pc[i], grads[j])
      if g_ij < 0:
        pc[i] -= g_ij * grads[j] / sq_norms[j]
  return pc.sum(0)


# -------------------------------------------------------------------------------------------
# The train steps


def _torchjd():
  import torchjd
  from torchjd import aggregation
  try:
    from torchjd.autojac import jac_to_grad, mtl_backward
  except ImportError:  # torchjd < 0.9: mtl_backward(losses, features, aggregator) aggregates
    return torchjd, aggregation, torchjd.mtl_backward, None
  return torchjd, aggregation, mtl_backward, jac_to_grad


class Peer:
  """One PyTorch model, SGD optimizer and batch; ``step()`` runs one train step of ``variant``.

  ``step()`` returns the detached losses (T,) computed before the update (no host sync).
  """

  def __init__(self, variant, head_channels, model_kwargs, batch, *, variables=None,
               learning_rate=1e-2, device="cpu", bf16=False, channels_last=False, seed=0):
    if variant not in VARIANTS:
      raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
    torch.manual_seed(seed)
    self.variant = variant
    self.device = torch.device(device)
    self.bf16 = bf16
    self.net = MultiTaskNet(head_channels=head_channels, **model_kwargs)
    if variables is not None:
      load_flax_variables(self.net, *variables)
    self.net.to(self.device)
    if channels_last:
      self.net.to(memory_format=torch.channels_last)
    self.net.train()
    self.tasks = tuple(head_channels)
    self.batch = to_torch_batch(batch, self.device, channels_last)
    self.size = tuple(self.batch["image"].shape[-2:])
    self.shared = list(self.net.backbone.parameters())
    self.head_params = [list(self.net.heads[t].parameters()) for t in self.tasks]
    self.optimizer = torch.optim.SGD(self.net.parameters(), lr=learning_rate, momentum=0.9)
    self.rng = random.Random(seed)
    self.chunk_size = None  # torchjd: all T rows of the Jacobian in one torch.vmap
    self.note = None
    if variant == "ew_compile":
      self._compiled_loss = torch.compile(self._ew_loss)
    if variant.startswith("torchjd_"):
      _, aggregation, self._mtl_backward, self._jac_to_grad = _torchjd()
      self._aggregator = (aggregation.UPGrad() if variant == "torchjd_upgrad"
                          else aggregation.PCGrad())
    self.step = getattr(self, "_step_" + variant)

  def _autocast(self):
    if self.bf16:
      return torch.autocast(self.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def _task_losses(self, features, per_task_features=None):
    losses = []
    for i, t in enumerate(self.tasks):
      f = features if per_task_features is None else per_task_features[i]
      losses.append(LOSSES[t](self.net.heads[t](f, self.size), self.batch))
    return losses

  def _ew_loss(self, images):
    return torch.stack(self._task_losses(self.net.backbone(images)))

  def _step_ew(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      losses = self._ew_loss(self.batch["image"])
    losses.sum().backward()
    self.optimizer.step()
    return losses.detach()

  def _step_ew_compile(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      losses = self._compiled_loss(self.batch["image"])
    losses.sum().backward()
    self.optimizer.step()
    return losses.detach()

  def _step_mgda_rep(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      features = self.net.backbone(self.batch["image"])
      reps = [features.detach().clone().requires_grad_() for _ in self.tasks]
      losses = self._task_losses(None, reps)
    for loss in losses:  # through the heads only; each head accumulates its own gradient
      loss.backward()
    grads = torch.stack([r.grad.reshape(-1).float() for r in reps])
    weights = min_norm_weights((grads @ grads.T).cpu().numpy())
    weights = torch.as_tensor(weights, dtype=grads.dtype, device=grads.device)
    combined = (weights[:, None] * grads).sum(0).reshape(features.shape)
    features.backward(combined.to(features.dtype))
    self.optimizer.step()
    return torch.stack(losses).detach()

  def _step_libmtl_pcgrad(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      features = self.net.backbone(self.batch["image"])
      losses = self._task_losses(features)
    n = len(self.shared)
    rows = []
    for i, loss in enumerate(losses):
      grads = torch.autograd.grad(loss, self.shared + self.head_params[i],
                                  retain_graph=i < len(losses) - 1)
      rows.append(torch.cat([g.reshape(-1) for g in grads[:n]]))
      for p, g in zip(self.head_params[i], grads[n:], strict=True):
        p.grad = g
    combined = libmtl_pcgrad(torch.stack(rows), self.rng)
    offset = 0
    for p in self.shared:
      p.grad = combined[offset:offset + p.numel()].view_as(p)
      offset += p.numel()
    self.optimizer.step()
    return torch.stack(losses).detach()

  def _torchjd_step(self):
    try:
      return self._torchjd_step_once()
    except RuntimeError as e:
      if self.chunk_size == 1:
        raise
      # torch.vmap over the backward fails under bf16 autocast on a CPU ("expected scalar type
      # BFloat16 but found Float"); torchjd's documented way out is parallel_chunk_size=1.
      self.chunk_size = 1
      self.note = f"parallel_chunk_size=1 (torch.vmap failed: {str(e)[:80]})"
      return self._torchjd_step_once()

  def _torchjd_step_once(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      features = self.net.backbone(self.batch["image"])
      losses = self._task_losses(features)
    if self._jac_to_grad is None:
      self._mtl_backward(losses, features, self._aggregator, tasks_params=self.head_params,
                         shared_params=self.shared, parallel_chunk_size=self.chunk_size)
    else:
      self._mtl_backward(losses, features=features, tasks_params=self.head_params,
                         shared_params=self.shared, parallel_chunk_size=self.chunk_size)
      self._jac_to_grad(self.shared, self._aggregator)
    self.optimizer.step()
    return torch.stack(losses).detach()

  _step_torchjd_upgrad = _torchjd_step
  _step_torchjd_pcgrad = _torchjd_step

  def synchronize(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)
