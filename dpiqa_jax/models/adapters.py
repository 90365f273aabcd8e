"""DP-IQA's two adapters: the T2I image adapter (diffusers `FullAdapter`) and the prompt MLP.

Names follow diffusers / the authors (`conv_in`, `body.{i}.in_conv`,
`body.{i}.resnets.{j}.block1`, `fc.0`, `fc.2`), so their state dicts load by name. Layout NHWC.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.layers import conv

Dtype = Any


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
    """PyTorch's PixelUnshuffle on NHWC: output channel c * r * r + dy * r + dx holds pixel (dy, dx)
    of each r x r cell of input channel c, the order the adapter's `conv_in` weights expect."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not a multiple of the adapter's downscale factor {factor}")
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // factor, w // factor, c * factor * factor)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """PyTorch AvgPool2d(2, stride 2, ceil_mode=True): on an odd side the last window is cut by the
    border and PyTorch divides by its in-bounds size, which is what excluding the padding does."""
    pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
    pooled = nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)
    return pooled.astype(x.dtype)  # flax divides by a float32 count, which would promote bfloat16


class AdapterResnetBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(x)))."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.relu(conv(self.channels, 3, "block1", self.dtype)(x))
        return x + conv(self.channels, 1, "block2", self.dtype)(h)


class AdapterBlock(nn.Module):
    """Optional 2x average-pool, a 1x1 conv where the width changes, then residual units."""

    channels: int
    num_res_blocks: int
    down: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.down:
            x = avg_pool_ceil(x)
        if x.shape[-1] != self.channels:
            x = conv(self.channels, 1, "in_conv", self.dtype)(x)
        for j in range(self.num_res_blocks):
            x = AdapterResnetBlock(self.channels, self.dtype, name=f"resnets.{j}")(x)
        return x


class ImageAdapter(nn.Module):
    """images (B, H, W, 3) -> one feature per U-Net down block, NHWC, each half the previous size."""

    channels: Sequence[int] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> list[jax.Array]:
        x = pixel_unshuffle(images, self.downscale_factor)
        x = conv(self.channels[0], 3, "conv_in", self.dtype)(x)
        features = []
        for i, width in enumerate(self.channels):
            x = AdapterBlock(width, self.num_res_blocks, down=i > 0, dtype=self.dtype, name=f"body.{i}")(x)
            features.append(x)
        return features


class TextAdapter(nn.Module):
    """The prompt MLP, Linear -> exact GELU -> Linear. The teacher adds `gamma * MLP(E)` to E."""

    dim: int = 768
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        h = nn.Dense(self.dim, dtype=self.dtype, name="fc.0")(embeddings)
        return nn.Dense(self.dim, dtype=self.dtype, name="fc.2")(nn.gelu(h, approximate=False))
