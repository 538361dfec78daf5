"""Task heads: dense per-pixel heads and a global classification head."""

import flax.linen as nn
import jax
import jax.numpy as jnp


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

