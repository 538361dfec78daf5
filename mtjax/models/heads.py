"""Task heads: dense per-pixel heads, a global classification head, and DeepLabV3's ASPP head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class DenseHead(nn.Module):
  """conv3×3 + BN + ReLU, conv1×1, bilinear upsampling to the input size (as in MTAN/LibMTL)."""

  out_channels: int
  hidden: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, output_size, train: bool):
    x = nn.Conv(self.hidden, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(features)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
    batch, _, _, channels = x.shape
    x = jax.image.resize(x, (batch, *output_size, channels), "bilinear")
    return x.astype(jnp.float32)


class ClassificationHead(nn.Module):
  """Global average pooling and a linear layer: logits ``(B, out_channels)``."""

  out_channels: int
  hidden: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, output_size, train: bool):
    del output_size, train
    x = jnp.mean(features, axis=(1, 2))
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    return nn.Dense(self.out_channels, dtype=self.dtype)(x).astype(jnp.float32)



def _torch_kernel_init(key, shape, dtype=jnp.float32):
  """``torch.nn.Conv2d``'s default weight init, ``kaiming_uniform_(a=√5)``: U(±1/√fan_in)."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")(key, shape, dtype)


def _torch_bias_init(fan_in: int):
  """``torch.nn.Conv2d``'s default bias init: U(±1/√fan_in)."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def resize_align_corners(x, size):
  """Bilinear resizing of ``x`` (B, H, W, C) to ``size`` (h, w) with corners aligned:
  ``F.interpolate(mode="bilinear", align_corners=True)``, where output pixel ``i`` reads input
  position ``i · (H - 1) / (h - 1)`` (0 when ``h = 1``). Two interpolation matrices, built on
  the host from the static shapes, applied in float32 at full precision."""
  def matrix(n_in, n_out):
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = np.arange(n_out, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return jnp.asarray(m)
  (_, h_in, w_in, _), (h_out, w_out) = x.shape, tuple(size)
  if (h_in, w_in) == (h_out, w_out):
    return x
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", matrix(h_in, h_out), x.astype(jnp.float32), precision=highest)
  return jnp.einsum("pw,bowc->bopc", matrix(w_in, w_out), x, precision=highest)


class TorchBatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` (momentum 0.1, eps 1e-5) with Linen's variable names (``scale``,
  ``bias``; ``batch_stats`` ``mean``, ``var``): the running variance is updated with the
  *unbiased* batch variance (``n / (n - 1)``), as torch does, where ``nn.BatchNorm`` uses the
  biased one. It matters where few values are normalised (ASPP's pooling branch: ``n`` = batch
  size). Statistics in float32, output in ``dtype``."""

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = x.size // channels
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * var * (n / max(n - 1, 1)))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class DeepLabHead(nn.Module):
  """DeepLabV3's head (Chen et al., 2017, "Rethinking Atrous Convolution"), as LibMTL's
  ``examples/nyu/aspp.py`` (``DeepLabHead``, ``ASPP``, ``ASPPConv``, ``ASPPPooling``) builds it:

    ASPP: [1×1 conv | 3×3 conv, dilation r for r in ``rates`` (12, 24, 36) | global average
    pool, 1×1 conv, broadcast back], each + BN + ReLU, ``hidden`` (256) channels each;
    concatenated, 1×1 conv + BN + ReLU + dropout (0.5, training only);
    then 3×3 conv + BN + ReLU, 1×1 conv (with bias) to ``out_channels``;

  and upsampled to ``output_size`` bilinearly with ``align_corners=True`` (LibMTL's
  ``process_preds`` in ``examples/nyu/main.py``). Bias-free convolutions but the last; torch's
  default initialisation and BatchNorm (:class:`TorchBatchNorm`). Dropout reads the
  ``"dropout"`` PRNG stream; a training pass without it is deterministic.
  """

  out_channels: int
  hidden: int = 256
  rates: tuple = (12, 24, 36)
  dropout: float = 0.5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, output_size, train: bool):
    def conv(name, x, kernel, dilation=1):
      pad = dilation * (kernel // 2)
      return nn.Conv(self.hidden, (kernel, kernel), padding=pad, kernel_dilation=dilation,
                     use_bias=False, dtype=self.dtype, kernel_init=_torch_kernel_init,
                     name=name)(x)

    def bn_relu(name, x):
      return nn.relu(TorchBatchNorm(dtype=self.dtype, name=name)(x, train))

    x = features.astype(self.dtype)
    branches = [bn_relu("branch0_bn", conv("branch0_conv", x, 1))]
    for k, rate in enumerate(self.rates, start=1):
      branches.append(bn_relu(f"branch{k}_bn", conv(f"branch{k}_conv", x, 3, rate)))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = bn_relu("pool_bn", conv("pool_conv", pooled, 1))
    branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.hidden)))  # 1×1 upsampled
    x = bn_relu("project_bn", conv("project_conv", jnp.concatenate(branches, axis=-1), 1))
    x = nn.Dropout(self.dropout, deterministic=not (train and self.has_rng("dropout")))(x)
    x = bn_relu("bn", conv("conv", x, 3))
    x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, kernel_init=_torch_kernel_init,
                bias_init=_torch_bias_init(self.hidden), name="classifier")(x)
    return resize_align_corners(x, output_size).astype(jnp.float32)


HEADS = ("task", "deeplab")
