"""EfficientNet B0..B7 with torchvision's architecture and state-dict names.

Modules carry torchvision's names (`features.0.0`, `features.1.0.block.2.fc1`, ...), so that
`dpiqa_jax.weights.torch_names.load_state_dict` maps a torchvision state dict by name, batch-norm
statistics included (collection `batch_stats`). The network stops at the last feature map
(torchvision's `features`); the pooling and ImageNet classifier are not built. Layout is NHWC.
"""
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.errors import UserError

Dtype = Any


class Stage(NamedTuple):
    expand_ratio: int
    kernel: int
    stride: int  # of the stage's first block; the others have stride 1
    in_channels: int
    out_channels: int
    blocks: int


# torchvision's EfficientNet-B0 stages, which the variants scale.
_B0_STAGES = tuple(Stage(*s) for s in (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
))


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    bn_eps: float = 1e-5  # torchvision keeps BatchNorm2d's defaults up to B4 ...
    bn_momentum: float = 0.1  # ... in PyTorch's convention (weight of the new batch statistic)


_B5_B7_NORM = {"bn_eps": 1e-3, "bn_momentum": 0.01}  # ... and changes them from B5 on
VARIANTS = {
    "b0": Variant(1.0, 1.0),
    "b1": Variant(1.0, 1.1),
    "b2": Variant(1.1, 1.2),
    "b3": Variant(1.2, 1.4),
    "b4": Variant(1.4, 1.8),
    "b5": Variant(1.6, 2.2, **_B5_B7_NORM),
    "b6": Variant(1.8, 2.6, **_B5_B7_NORM),
    "b7": Variant(2.0, 3.1, **_B5_B7_NORM),
    "tiny": Variant(0.25, 0.25),  # not torchvision's (no ImageNet weights): one block a stage, for tests
}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never more than 10% below `value` (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def stages(variant: str) -> list[Stage]:
    """The B0 stages scaled by the variant's width (channels) and depth (blocks per stage)."""
    v = get_variant(variant)
    width = lambda channels: make_divisible(channels * v.width)
    return [s._replace(in_channels=width(s.in_channels), out_channels=width(s.out_channels),
                       blocks=int(math.ceil(s.blocks * v.depth))) for s in _B0_STAGES]


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(f"unknown EfficientNet variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d: running statistics in eval mode; batch statistics (biased variance) in
    training, with running averages updated in PyTorch's convention. Flax's BatchNorm averages the
    biased batch variance, PyTorch the unbiased one: matching PyTorch keeps fine-tuning from
    torchvision's statistics identical. Statistics are computed in float32 at least; under jit with
    a batch-sharded input they are the global batch's."""

    eps: float
    momentum: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if train:
            mean, var = jnp.mean(x32, axis=(0, 1, 2)), jnp.var(x32, axis=(0, 1, 2))
            if not self.is_initializing():
                n = x.size // channels
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * n / max(n - 1, 1)
        else:
            mean, var = running_mean.value, running_var.value
        gain = scale * jax.lax.rsqrt(var + self.eps)
        return (x32 * gain + (bias - mean * gain)).astype(self.dtype)


def depthwise_shifted_sum(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """A depthwise convolution as k*k strided slices times per-channel weights, summed in float32:
    XLA:CPU runs this 50x faster than its grouped convolution (1.3 ms against 75 ms for
    16x32x32x96, 3x3, measured; PyTorch's takes 1.5 ms)."""
    k = kernel.shape[0]
    out_h = (x.shape[1] + 2 * pad - k) // stride + 1
    out_w = (x.shape[2] + 2 * pad - k) // stride + 1
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    padded = jnp.pad(wide, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = (padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            * kernel[i, j, 0] for i in range(k) for j in range(k))
    return sum(taps).astype(x.dtype)


def depthwise_grouped(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """The same depthwise convolution as XLA's grouped convolution (what GPUs and TPUs run)."""
    return jax.lax.conv_general_dilated(x, kernel, (stride,) * 2, [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


class DepthwiseConv(nn.Module):
    """nn.Conv's parameter (`kernel` (k, k, 1, C), no bias) for a depthwise convolution with
    symmetric padding; on the CPU computed by `depthwise_shifted_sum`, elsewhere by XLA's
    grouped convolution (chosen per platform when lowered, so exports for several platforms get each
    its own)."""

    kernel_size: int
    stride: int
    pad: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        geometry = {"stride": self.stride, "pad": self.pad}
        return jax.lax.platform_dependent(x, kernel, cpu=functools.partial(depthwise_shifted_sum, **geometry),
                                          default=functools.partial(depthwise_grouped, **geometry))


class ConvNormAct(nn.Module):
    """torchvision's Conv2dNormActivation: conv `0` (no bias, 'same' padding) -> BatchNorm `1` -> SiLU."""

    features: int
    kernel: int
    eps: float
    momentum: float
    stride: int = 1
    groups: int = 1
    activation: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k, pad = self.kernel, (self.kernel - 1) // 2
        if self.groups > 1 and self.groups == self.features == x.shape[-1]:
            x = DepthwiseConv(k, self.stride, pad, self.dtype, name="0")(x)
        else:
            x = nn.Conv(self.features, (k, k), strides=self.stride, padding=((pad, pad), (pad, pad)),
                        feature_group_count=self.groups, use_bias=False, dtype=self.dtype, name="0")(x)
        x = BatchNorm(self.eps, self.momentum, self.dtype, name="1")(x, train)
        return nn.silu(x) if self.activation else x


class SqueezeExcitation(nn.Module):
    """torchvision's SqueezeExcitation with SiLU: 1x1 convs `fc1`, `fc2` (with bias) on the global mean."""

    squeeze: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32))
        s = s.astype(self.dtype)
        s = nn.silu(nn.Conv(self.squeeze, (1, 1), dtype=self.dtype, name="fc1")(s))
        s = nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="fc2")(s))
        return x * s


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> squeeze-excitation -> 1x1 project, as
    `block.0..3` (`block.0..2` without expansion). The residual branch is dropped per sample with
    probability `drop_prob` in training (torchvision's 'row' stochastic depth, rng stream 'dropout')."""

    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    drop_prob: float
    eps: float
    momentum: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        expanded = make_divisible(in_channels * self.expand_ratio)
        norm = {"eps": self.eps, "momentum": self.momentum, "dtype": self.dtype}
        h, i = x, 0
        if expanded != in_channels:
            h, i = ConvNormAct(expanded, 1, name="block.0", **norm)(h, train), 1
        h = ConvNormAct(expanded, self.kernel, stride=self.stride, groups=expanded, name=f"block.{i}",
                        **norm)(h, train)
        h = SqueezeExcitation(max(1, in_channels // 4), self.dtype, name=f"block.{i + 1}")(h)
        h = ConvNormAct(self.out_channels, 1, activation=False, name=f"block.{i + 2}", **norm)(h, train)
        if self.stride != 1 or in_channels != self.out_channels:
            return h
        # A per-sample mask broadcast over H, W, C and scaled by 1 / (1 - p) is stochastic depth.
        drop_path = nn.Dropout(self.drop_prob, broadcast_dims=(1, 2, 3), name="stochastic_depth")
        return drop_path(h, deterministic=not train) + x


class EfficientNet(nn.Module):
    """images (B, H, W, 3) -> torchvision's `features` output (B, H/32, W/32, 4 * last stage channels),
    e.g. (B, 16, 16, 2560) for B7 at 512 px. `train=True` uses batch statistics (call `apply` with
    `mutable=['batch_stats']`) and stochastic depth (needs an rng named 'dropout')."""

    variant: str = "b7"
    stochastic_depth_prob: float = 0.2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        v = get_variant(self.variant)
        norm = {"eps": v.bn_eps, "momentum": v.bn_momentum, "dtype": self.dtype}
        config = stages(self.variant)
        stem = ConvNormAct(config[0].in_channels, 3, stride=2, name="features.0", **norm)
        x = stem(x.astype(self.dtype), train)
        total, block_id = sum(s.blocks for s in config), 0
        for i, s in enumerate(config, start=1):
            for j in range(s.blocks):
                # torchvision's linear schedule: 0 for the first block, towards the full probability.
                drop = self.stochastic_depth_prob * block_id / total
                x = MBConv(s.out_channels, s.expand_ratio, s.kernel, s.stride if j == 0 else 1, drop,
                           name=f"features.{i}.{j}", **norm)(x, train)
                block_id += 1
        head = ConvNormAct(4 * config[-1].out_channels, 1, name=f"features.{len(config) + 1}", **norm)
        return head(x, train)
