"""SegNet-MTAN (Liu, Johns & Davison, CVPR 2019), wired as LibMTL's ``examples/nyu/segnet_mtan.py``.

The model of the MTAN SegNet rows (MTAN, CAGrad, Nash-MTL, FAMO on NYUv2 and Cityscapes):

- a shared SegNet (Badrinarayanan et al., 2017) on VGG-16's layout: five encoder levels of
  2, 2, 3, 3, 3 conv3×3 + BN + ReLU layers (``filters = width · (1, 2, 4, 8, 8)``), each
  followed by a 2×2 max-pool that keeps its indices, and five decoder levels that max-unpool
  with those indices and mirror the convolutions;
- per task ``t`` and level ``j``, an encoder attention mask ``a^t_j = h^t_j([u_j ; p^t_{j-1}])``
  (``h``: conv1×1 + BN + ReLU + conv1×1 + BN + sigmoid, LibMTL's ``att_layer``; ``u_j`` the output
  of the level's first layer, ``p^t_{j-1}`` the previous attended feature after the *shared*
  ``encoder_block_att`` conv and a max-pool) over the level's output, and the mirror image in
  the decoder (the attended feature upsampled ×2 bilinearly with ``align_corners=True``, the
  shared ``decoder_block_att`` conv, a mask over the unpooled input and the decoder level's
  output), MTAN's Eqs. (1)–(2);
- per task a prediction layer, LibMTL's ``SegNet_MTAN_decoder``: conv3×3 (``width`` channels)
  then conv1×1 to the task's channels, no normalisation in between.

Every convolution has a bias (as the reference; before BatchNorm it has no effect on the
output, but it is a parameter of the reference and of its state dicts). Initialisation as the
reference: Xavier-normal kernels and zero biases in the encoder (``SegNet_MTAN_encoder``'s loop),
PyTorch's default (uniform ±1/√fan_in for kernel and bias) in the prediction layers. BatchNorm
is PyTorch's (:class:`mtjax.models.heads.TorchBatchNorm`: ε = 1e-5, momentum 0.1, the running
variance from the unbiased batch variance); a shared ``*_block_att`` layer updates its
statistics once per task and call, as in the reference.

Parameter labels: LibMTL's encoder is everything but the prediction layers, and its
``get_share_params`` (what its gradient methods balance) is the whole encoder, the per-task
attention included (the MTAN authors' code and Nash-MTL's ``shared_parameters`` do the same):
``"shared/segnet"`` (encoder/decoder convolutions), ``"shared/attention"`` (the shared
``*_block_att`` convolutions), ``"shared/attention/<task>"`` (task ``t``'s masks); the
prediction layers are ``"<task>"``. Each task's representation (its attended decoder output) is
its own, so the model has no shared encoder in mtjax's sense: the train step takes the general
path (a VJP of the loss vector with respect to everything labelled shared) and refuses the
representation level.

Relations: ``"segnet_mtan/<task>/encoder"`` and ``"segnet_mtan/<task>/decoder"``, the batch means
of the 5 masks of each side (a ``(5,)`` array, level 0 the finest).

Parameters (``f = filters``, ``T`` tasks, ``C_t`` task ``t``'s output channels; a conv
``k×k`` from ``a`` to ``b`` channels has ``k²ab + b``, a BN ``2b``; :func:`parameter_count`):
shared SegNet + shared attention convolutions + ``T`` × masks + ``Σ_t (9f₀² + f₀ + f₀C_t + C_t)``.
At width 64 with NYUv2's tasks (13 classes, depth, normals) that is LibMTL's 44,229,073
(``tests/models/test_segnet.py``).

Differences from the MTAN authors' ``im2im_pred/model_segnet_mtan.py`` (lorenmt/mtan): the same
layers and forward, but their prediction layers sit inside the one module (``pred_task{1,2,3}``,
Xavier-initialised), the segmentation output is ``log_softmax``-ed and the normals output
L2-normalised inside the model (LibMTL and mtjax leave both to the loss and metrics: the argmax
and the normalised normals are the same), and it has the three ``logsigma`` of its uncertainty
weighting as parameters. Cityscapes (the FAMO / CAGrad / Nash-MTL code) is the same network
with two tasks.
"""

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtjax.models import labels
from mtjax.models.heads import TorchBatchNorm
from mtjax.models.labels import SHARED
from mtjax.models.multitask import Common

LEVELS = 5
# Layers after each level's first conv: conv_block_enc / conv_block_dec of LibMTL (VGG-16: 2,
# 2, 3, 3, 3 convolutions per level).
_EXTRA_LAYERS = (1, 1, 2, 2, 2)
# LibMTL's task names (examples/nyu/main_segnet.py, task_dict order) for mtjax's.
LIBMTL_TASK_NAMES = {"segmentation": "segmentation", "depth": "depth", "normals": "normal"}
BN_MOMENTUM = 0.9     # PyTorch's momentum 0.1
BN_EPSILON = 1e-5


def filters(width: int) -> tuple[int, ...]:
  """The channels of the 5 levels: LibMTL's ``[64, 128, 256, 512, 512]`` at ``width = 64``."""
  return (width, 2 * width, 4 * width, 8 * width, 8 * width)


def _torch_default_uniform(fan_in: int):
  """PyTorch's default Conv2d init of kernel and bias: U(-1/√fan_in, 1/√fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


_XAVIER_NORMAL = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # torch xavier_normal_


class _Conv(nn.Module):
  """A conv with bias, ``kernel``×``kernel``, padding ``kernel // 2``; Xavier-normal kernel and
  zero bias (the encoder's), or PyTorch's default init (``torch_init``: the prediction layers)."""

  channels: int
  kernel: int
  dtype: jnp.dtype
  torch_init: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    if self.torch_init:
      init = _torch_default_uniform(k * k * x.shape[-1])
      kernel_init, bias_init = init, init
    else:
      kernel_init, bias_init = _XAVIER_NORMAL, nn.initializers.zeros
    return nn.Conv(self.channels, (k, k), padding=k // 2, dtype=self.dtype,
                   kernel_init=kernel_init, bias_init=bias_init, name="conv")(x)


def _norm(x, train, dtype, name):
  """``torch.nn.BatchNorm2d``: its running variance from the unbiased batch variance."""
  return TorchBatchNorm(BN_MOMENTUM, BN_EPSILON, dtype, name=name)(x, train)


class _ConvLayer(nn.Module):
  """LibMTL's ``conv_layer``: conv3×3 (bias) + BN + ReLU."""

  channels: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    x = _Conv(self.channels, 3, self.dtype, name="conv0")(x)
    return nn.relu(_norm(x, train, self.dtype, "bn0"))


class _AttLayer(nn.Module):
  """LibMTL's ``att_layer``: conv1×1 + BN + ReLU + conv1×1 + BN + sigmoid (biases kept)."""

  channels: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(_norm(_Conv(self.channels, 1, self.dtype, name="conv0")(x), train, self.dtype,
                      "bn0"))
    return nn.sigmoid(_norm(_Conv(self.channels, 1, self.dtype, name="conv1")(x), train,
                            self.dtype, "bn1"))


class _Prediction(nn.Module):
  """LibMTL's ``SegNet_MTAN_decoder``: conv3×3 (``hidden`` channels), conv1×1 to ``channels``."""

  hidden: int
  channels: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = _Conv(self.hidden, 3, self.dtype, torch_init=True, name="conv0")(x)
    return _Conv(self.channels, 1, self.dtype, torch_init=True, name="conv1")(x)


def max_pool_with_indices(x):
  """2×2 max-pool of ``x`` (B, H, W, C), stride 2, with the argmax of each window (0..3, row
  major; the first maximum, as PyTorch's ``MaxPool2d(return_indices=True)``). The gradient goes
  to the argmax only, as PyTorch's."""
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  windows = windows.reshape(b, h // 2, w // 2, c, 4)
  indices = jnp.argmax(windows, axis=-1)
  pooled = jnp.take_along_axis(windows, indices[..., None], axis=-1)[..., 0]
  return pooled, indices


def max_unpool(x, indices):
  """PyTorch's ``MaxUnpool2d(2, 2)``: each value of ``x`` (B, h, w, C) to the position
  ``indices`` of its 2×2 window, zeros elsewhere: (B, 2h, 2w, C)."""
  b, h, w, c = x.shape
  windows = jax.nn.one_hot(indices, 4, dtype=x.dtype) * x[..., None]
  return windows.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h,
                                                                              2 * w, c)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of 1-D linear interpolation with ``align_corners=True``."""
  out = np.zeros((n_out, n_in), np.float32)
  if n_in == 1 or n_out == 1:
    out[:, 0] = 1.0
    return out
  position = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  low = np.minimum(np.floor(position).astype(np.int64), n_in - 2)
  frac = position - low
  rows = np.arange(n_out)
  out[rows, low] += (1.0 - frac).astype(np.float32)
  out[rows, low + 1] += frac.astype(np.float32)
  return out


def upsample_align_corners(x, size):
  """``F.interpolate(x, size, mode='bilinear', align_corners=True)`` for NHWC ``x``."""
  rows = jnp.asarray(_align_corners_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(_align_corners_matrix(x.shape[2], size[1]), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


class SegNetMTAN(nn.Module):
  """SegNet-MTAN (see the module docstring): ``{task: output}`` at the input's resolution.

  ``tasks``: the task names; ``channels``: each task's output channels; ``filters``: the 5
  levels' channels (:func:`filters`).
  """

  tasks: tuple[str, ...]
  channels: tuple[int, ...]
  filters: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    f, dtype = self.filters, self.dtype
    height, width = images.shape[1:3]
    if height % 2 ** LEVELS or width % 2 ** LEVELS:
      raise ValueError(f"dataset.image_size: SegNet-MTAN max-pools {LEVELS} times by 2, so the "
                       f"height and width must be multiples of {2 ** LEVELS}; got "
                       f"{(height, width)}")

    def layer(channels, name):
      return _ConvLayer(channels, dtype, name=name)

    def block(kind, level, channels):
      return [layer(channels, name) for name in _block_names(kind, level)]

    def run(layers, x):
      for module in layers:
        x = module(x, train)
      return x

    # The shared SegNet (LibMTL's g_encoder, g_maxpool, indices, g_upsampl, g_decoder).
    first, last, indices = [], [], []
    x = images.astype(dtype)
    for i in range(LEVELS):
      first.append(layer(f[i], f"encoder_block_{i}")(x, train))
      last.append(run(block("conv_block_enc", i, f[i]), first[i]))
      x, index = max_pool_with_indices(last[i])
      indices.append(index)
    unpooled, decoded = [], []
    for j in range(LEVELS):
      level = LEVELS - 1 - j
      unpooled.append(max_unpool(x, indices[level]))
      channels = f[max(level - 1, 0)]
      x = layer(channels, f"decoder_block_{level}")(unpooled[j], train)
      x = run(block("conv_block_dec", level, channels), x)
      decoded.append(x)

    # The attention convolutions shared by the tasks (LibMTL's encoder_block_att and
    # decoder_block_att).
    enc_att_conv = [layer(f[min(i + 1, LEVELS - 1)], f"encoder_block_att_{i}")
                    for i in range(LEVELS)]
    dec_att_conv = [layer(f[LEVELS - 1] if i == LEVELS - 1 else f[max(i - 1, 0)],
                          f"decoder_block_att_{i}") for i in range(LEVELS)]

    outputs = {}
    for task, out_channels in zip(self.tasks, self.channels, strict=True):
      enc_means, dec_means = [], []
      attended = None
      for j in range(LEVELS):
        inputs = first[j] if attended is None else jnp.concatenate([first[j], attended], -1)
        mask = _AttLayer(f[j], dtype, name=f"encoder_att_{task}_{j}")(inputs, train)
        enc_means.append(jnp.mean(mask.astype(jnp.float32)))
        attended, _ = max_pool_with_indices(enc_att_conv[j](mask * last[j], train))
      for j in range(LEVELS):
        level = LEVELS - 1 - j
        up = upsample_align_corners(attended, (2 * attended.shape[1], 2 * attended.shape[2]))
        up = dec_att_conv[level](up, train)
        mask = _AttLayer(f[max(level - 1, 0)], dtype, name=f"decoder_att_{task}_{level}")(
            jnp.concatenate([unpooled[j], up], -1), train)
        dec_means.append(jnp.mean(mask.astype(jnp.float32)))
        attended = mask * decoded[j]
      self.sow("relations", f"segnet_mtan/{task}/encoder", jnp.stack(enc_means))
      self.sow("relations", f"segnet_mtan/{task}/decoder", jnp.stack(dec_means[::-1]))
      out = _Prediction(f[0], out_channels, dtype, name=f"pred_{task}")(attended)
      outputs[task] = out.astype(jnp.float32)
    return outputs

  def label_table(self) -> dict:
    """``{top-level name: label}`` (see :func:`mtjax.models.labels.from_table`): the names
    ``__call__`` gives its layers."""
    segnet = [f"{kind}_{i}" for kind in ("encoder_block", "decoder_block") for i in range(LEVELS)]
    segnet += [name for kind in ("conv_block_enc", "conv_block_dec") for i in range(LEVELS)
               for name in _block_names(kind, i)]
    return {**{name: f"{SHARED}/segnet" for name in segnet},
            **{f"{side}_{i}": f"{SHARED}/attention"
               for side in ("encoder_block_att", "decoder_block_att") for i in range(LEVELS)},
            **{f"{side}_{task}_{i}": f"{SHARED}/attention/{task}" for task in self.tasks
               for side in ("encoder_att", "decoder_att") for i in range(LEVELS)},
            **{f"pred_{task}": task for task in self.tasks}}

  def param_label(self, path) -> str:
    """``"shared/segnet"``, ``"shared/attention"``, ``"shared/attention/<task>"`` (LibMTL's
    encoder: its shared parameters); ``"<task>"`` (the prediction layers)."""
    return labels.from_table(self.label_table(), path, "SegNet-MTAN")


def _block_names(kind: str, level: int) -> list[str]:
  """The names of the layers of block ``kind`` (``conv_block_enc``, ``conv_block_dec``) at
  ``level``: ``<kind>_<level>`` for one layer, ``<kind>_<level>_<k>`` for several."""
  count = _EXTRA_LAYERS[level]
  if count == 1:
    return [f"{kind}_{level}"]
  return [f"{kind}_{level}_{k}" for k in range(count)]


def _out_channels(name, task) -> int:
  head = task.head(hidden=1, dtype=jnp.float32)
  channels = getattr(head, "out_channels", None)
  if not isinstance(channels, int) or type(head).__name__ != "DenseHead":
    raise ValueError(f"model.architecture: 'segnet_mtan' predicts dense per-pixel tasks; task "
                     f"{name!r} has a {type(head).__name__}")
  return channels


def build_segnet_mtan(backbone: str, tasks: Mapping, common: Common) -> SegNetMTAN:
  """``segnet_mtan``: SegNet-MTAN of ``filters(width)`` channels (64: the reference's); the
  network is its own encoder, so ``config.model.backbone`` must be ``"segnet"``;
  ``output_stride`` (32: five poolings), ``stem`` and ``head_hidden`` (the prediction layers
  have ``width`` channels, as the reference) are not read."""
  width, dtype = common.width, common.dtype
  if backbone != "segnet":
    raise ValueError(f"model.backbone: got {backbone!r}; architecture 'segnet_mtan' is its own "
                     "encoder: expected 'segnet'")
  if not isinstance(width, int) or isinstance(width, bool) or width < 1:
    raise ValueError(f"model.width: got {width!r}; expected an int >= 1 (64: the reference's "
                     "filters 64, 128, 256, 512, 512)")
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
  names = tuple(tasks)
  channels = tuple(_out_channels(name, task) for name, task in tasks.items())
  return SegNetMTAN(names, channels, filters(width), jnp.dtype(dtype))


# ---------------------------------------------------------------------------------------------
# LibMTL state dicts


def _libmtl_order(tasks) -> list[str]:
  """The model's tasks in LibMTL's ``task_dict`` order (segmentation, depth, normal): the
  index of a task's attention branch in LibMTL's encoder (its ``encoder_att.<i>``)."""
  known = [t for t in LIBMTL_TASK_NAMES if t in tasks]
  return known + [t for t in tasks if t not in LIBMTL_TASK_NAMES]


# Top-level parameters of LibMTL's weighting methods (UW, GradNorm, IMTL: ``loss_scale``) in its
# saved model: the method's state, not the model's.
_IGNORED = ("loss_scale",)
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _layer_name(module: str, sub: str, tasks, order) -> str:
  """LibMTL's module name (before ``.weight``) of mtjax's ``module/sub``."""
  for task in tasks:
    if module == f"pred_{task}":
      return f"decoders.{LIBMTL_TASK_NAMES.get(task, task)}.pred_task.{sub[-1]}"
    for side in ("encoder_att", "decoder_att"):
      match = re.fullmatch(rf"{side}_{re.escape(task)}_(\d)", module)
      if match:
        position = {"conv0": 0, "bn0": 1, "conv1": 3, "bn1": 4}[sub]
        return f"encoder.{side}.{order.index(task)}.{match.group(1)}.{position}"
  parts = module.rsplit("_", 2)
  if re.fullmatch(r"\d", parts[-2]):          # conv_block_{enc,dec}_<level>_<k>: nested layers
    prefix = f"encoder.{parts[0]}.{parts[1]}.{parts[2]}"
  else:
    base, level = module.rsplit("_", 1)
    prefix = f"encoder.{base}.{level}"
  return f"{prefix}.{ {'conv0': 0, 'bn0': 1}[sub] }"


def libmtl_name(path, tasks) -> str:
  """LibMTL's state-dict key of the mtjax variable at ``path`` (in ``params`` or
  ``batch_stats``) of a :class:`SegNetMTAN` with ``tasks``."""
  order = _libmtl_order(tasks)
  module, sub, *rest = path
  leaf = rest[-1]
  layer = _layer_name(module, sub, tasks, order)
  if leaf == "kernel":
    return f"{layer}.weight"
  if rest[0] == "conv":                      # a conv's bias
    return f"{layer}.bias"
  return f"{layer}.{_BN_LEAVES[leaf]}"


def _model_tasks(params) -> tuple[str, ...]:
  return tuple(name[len("pred_"):] for name in params if name.startswith("pred_"))


def libmtl_variables(state_dict: Mapping, variables: Mapping) -> dict:
  """``variables`` (``{"params", "batch_stats"}`` of a :class:`SegNetMTAN`) filled from a LibMTL
  SegNet-MTAN state dict: ``encoder.*`` (``SegNet_MTAN_encoder``) and ``decoders.<task>.*``
  (``SegNet_MTAN_decoder``; LibMTL's task ``normal`` is mtjax's ``normals``), numpy arrays or
  anything ``np.asarray`` reads. Kernels go from OIHW to HWIO; BatchNorm ``weight``/``bias`` to
  ``scale``/``bias``, ``running_mean``/``running_var`` to the batch statistics;
  ``num_batches_tracked`` and the weighting method's ``loss_scale`` are not used. The attention
  branch of a task is its index in LibMTL's task order (segmentation, depth, normal).

  Raises ValueError listing the missing, mismatched and unexpected tensors.
  """
  import flax.traverse_util as traverse

  tasks = _model_tasks(variables["params"])
  used, missing, mismatched, out = set(), [], [], {}
  for kind in ("params", "batch_stats"):
    flat = {}
    for path, leaf in traverse.flatten_dict(dict(variables.get(kind, {}))).items():
      name = libmtl_name(path, tasks)
      if name not in state_dict:
        missing.append(f"{name} (for {kind}/{'/'.join(path)})")
        continue
      used.add(name)
      value = np.asarray(state_dict[name], np.float32)
      if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
      if value.shape != tuple(leaf.shape):
        mismatched.append(f"{name}: file {tuple(value.shape)}, model {tuple(leaf.shape)}")
        continue
      flat[path] = jnp.asarray(value, leaf.dtype)
    out[kind] = traverse.unflatten_dict(flat) if flat else {}
  unexpected = sorted(k for k in state_dict if k not in used
                      and not k.endswith("num_batches_tracked") and not k.startswith(_IGNORED))
  if missing or mismatched or unexpected:
    lines = [f"{title} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
             for title, items in (("missing", missing), ("mismatched shapes", mismatched),
                                  ("unexpected", unexpected)) if items]
    raise ValueError("SegNet-MTAN (check config.tasks, config.model.width and the dataset's "
                     "classes): " + "; ".join(lines))
  return {**variables, **out}


def parameter_count(width: int, channels) -> int:
  """The parameters of SegNet-MTAN with ``filters(width)`` and tasks of ``channels`` outputs,
  by the layers of LibMTL's ``segnet_mtan.py`` (BatchNorm: scale and bias)."""
  f = filters(width)

  def conv(k, a, b):
    return k * k * a * b + b

  def layer(a, b):          # conv_layer
    return conv(3, a, b) + 2 * b

  def att(a, b):            # att_layer
    return conv(1, a, b) + 2 * b + conv(1, b, b) + 2 * b

  count = 0
  for i in range(LEVELS):
    count += layer(3 if i == 0 else f[i - 1], f[i]) + _EXTRA_LAYERS[i] * layer(f[i], f[i])
    c = f[max(i - 1, 0)]
    count += layer(f[i], c) + _EXTRA_LAYERS[i] * layer(c, c)
    count += layer(f[i], f[min(i + 1, LEVELS - 1)])                          # encoder_block_att
    count += layer(f[i], f[LEVELS - 1] if i == LEVELS - 1 else c)            # decoder_block_att
  per_task = sum(att(f[j] if j == 0 else 2 * f[j], f[j]) for j in range(LEVELS))
  per_task += att(2 * f[0], f[0]) + sum(att(f[j] + f[j - 1], f[j - 1]) for j in range(1, LEVELS))
  return count + len(channels) * per_task + sum(conv(3, f[0], f[0]) + conv(1, f[0], c)
                                                for c in channels)
