"""Building blocks shared by the U-Net and the VAE encoder.

Every module and parameter carries the name diffusers gives it (dots included, e.g.
`downsamplers.0`), so that a PyTorch state dict maps onto the Flax tree by name alone
(see `dpiqa_jax.weights.torch_names`). Layout is NHWC.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding=None) -> nn.Conv:
    """A PyTorch-style convolution: symmetric padding of kernel // 2 unless given."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def group_norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
    # Two-pass variance: the fast E[x^2] - E[x]^2 form loses the precision the parity tests need.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (time-embedding shift 'default', output scale 1)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The U-Net pads 1 on each side; the VAE pads only bottom/right."""

    channels: int
    vae_padding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.vae_padding else 1
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype)(x)


def score_mlp(feature_map: jax.Array, width: int, dtype: Dtype) -> jax.Array:
    """Flatten (C, H, W) as PyTorch does, so that the authors' fc1 loads unchanged, then
    fc1 -> ReLU -> fc2 -> ReLU -> fc3 -> (B,). Call it inside a compact method: the layers are
    created in the caller's scope, under the names `fc1`..`fc3`."""
    x = feature_map.transpose(0, 3, 1, 2).reshape(feature_map.shape[0], -1)
    x = nn.relu(nn.Dense(width, dtype=dtype, name="fc1")(x))
    x = nn.relu(nn.Dense(width, dtype=dtype, name="fc2")(x))
    return nn.Dense(1, dtype=dtype, name="fc3")(x)[:, 0]
