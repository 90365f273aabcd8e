"""The DP-IQA student: EfficientNet features -> transposed conv -> quality feature map -> score.

Parameter tree (names as the authors' state dict): `base_model` (torchvision EfficientNet,
`features.*`, with batch statistics), `conv_transpose`, `fc1`..`fc3`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.efficientnet import EfficientNet
from dpiqa_jax.models.layers import score_mlp

Dtype = Any


class ConvTranspose2d(nn.Module):
    """PyTorch's ConvTranspose2d, its param stored as PyTorch stores it: `weight` (in, out, kH, kW) and
    `bias`, which the state-dict name mapping copies unchanged.

    A transposed conv is the gradient of a conv: a stride-1 conv of the input dilated by `stride`
    (lhs dilation), with the kernel flipped spatially and its in/out axes swapped ('IOHW': the weight's
    axis 1 gives the output features). PyTorch's `padding` p removes p rows from each side of the full
    output, i.e. pads the dilated input by k - 1 - p; `output_padding` adds rows at the bottom/right.
    Output side: (H - 1) * stride - 2p + k + output_padding."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    output_padding: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        weight = self.param("weight", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                            (x.shape[-1], self.features, k, k))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        low = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.flip(weight, (2, 3)).astype(self.dtype), window_strides=(1, 1),
            padding=((low, low + self.output_padding),) * 2, lhs_dilation=(self.stride, self.stride),
            dimension_numbers=("NHWC", "IOHW", "NHWC"))
        return y + bias.astype(self.dtype)


class Student(nn.Module):
    """images (B, H, W, 3) in [0, 1] (no ImageNet normalisation) -> (score (B,), student feature map
    (B, H/8, W/8, map_channels)), e.g. a 64x64x8 map for 512-px inputs, the size of the teacher's.
    `train=True` is the EfficientNet's training mode (batch statistics, stochastic depth)."""

    variant: str = "b7"
    map_channels: int = 8
    fc_width: int = 512
    stochastic_depth_prob: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        base = EfficientNet(self.variant, self.stochastic_depth_prob, self.dtype, name="base_model")
        x = base(images, train)
        x = ConvTranspose2d(self.map_channels, 3, stride=2, padding=1, output_padding=1, dtype=self.dtype,
                            name="conv_transpose")(x)
        # The authors resize to 64x64 (nearest) from 32x32 at 512 px: an exact 2x nearest upsampling.
        feature_map = jnp.repeat(jnp.repeat(nn.relu(x), 2, axis=1), 2, axis=2)
        return score_mlp(feature_map, self.fc_width, self.dtype), feature_map
