"""The quality feature decoder (QFD): four U-Net features -> quality feature map and score.

Parameter names are the authors' (`conv1`..`conv4`, `se1`..`se4`, `fuse_conv`, `se_fuse`,
`conv_score1`..`conv_score3`, `fc1`..`fc3`). Their `bnc1` and `classifier_dist` are never
used in the forward pass, so they are not created here; the loader skips their keys.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.models.layers import conv, score_mlp

Dtype = Any
CUBIC_A = -0.75  # PyTorch's bicubic coefficient (jax.image.resize uses -0.5)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel at the four taps floor-1 .. floor+2 of a fractional offset t in [0, 1)."""
    a = CUBIC_A
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of torch's bicubic interpolation along one axis (align_corners False)."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5  # not clamped at 0
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, size_in - 1)  # border replicate
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (np.arange(size_out)[:, None], taps), weights)
    return matrix.astype(np.float32)


def bicubic_resize(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch.nn.functional.interpolate(mode='bicubic', align_corners=False) on NHWC, as two matmuls."""
    (h, w), (oh, ow) = x.shape[1:3], out_hw
    if (h, w) == (oh, ow):
        return x
    rows = jnp.asarray(bicubic_matrix(h, oh), x.dtype)
    cols = jnp.asarray(bicubic_matrix(w, ow), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: channels rescaled by sigmoid(fc(relu(fc(global average))))."""

    reduction: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        y = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
        y = nn.relu(nn.Dense(channels // self.reduction, use_bias=False, dtype=self.dtype, name="fc.0")(y))
        y = nn.sigmoid(nn.Dense(channels, use_bias=False, dtype=self.dtype, name="fc.2")(y))
        return x * y[:, None, None, :].astype(x.dtype)


class QualityFeatureDecoder(nn.Module):
    """[f1, f2, f3, f4] NHWC (= U-Net up-block outputs u3, u2, u1, u0) ->
    (score (B,), quality feature map (B, map_size, map_size, score_channels[-1]))."""

    map_size: int = 64
    width: int = 512
    reduction: int = 16
    score_channels: Sequence[int] = (128, 32, 8)
    fc_width: int = 512
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
        size = (self.map_size, self.map_size)
        branches = []
        for i, f in enumerate(features, start=1):
            x = conv(self.width, 3, f"conv{i}", self.dtype)(bicubic_resize(f, size))
            branches.append(SEBlock(self.reduction, self.dtype, name=f"se{i}")(x))
        x = conv(self.width, 3, "fuse_conv", self.dtype)(jnp.concatenate(branches, axis=-1))
        x = SEBlock(self.reduction, self.dtype, name="se_fuse")(x)
        for i, channels in enumerate(self.score_channels, start=1):
            x = nn.relu(conv(channels, 1, f"conv_score{i}", self.dtype)(x))
        return score_mlp(x, self.fc_width, self.dtype), x
