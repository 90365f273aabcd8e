"""The encoder half of diffusers' `AutoencoderKL` (SD-1.5's VAE), NHWC.

Parameters sit where AutoencoderKL keeps them (`encoder.conv_in`, `encoder.down_blocks.{i}...`,
`encoder.mid_block...`, `quant_conv`), so its state dict loads by name; the decoder's keys are
simply unused. DP-IQA feeds [0, 1] images to the VAE unchanged (no shift to [-1, 1]).
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.attention import Attention
from dpiqa_jax.models.layers import Downsample2D, ResnetBlock2D, conv, group_norm

Dtype = Any
EPS = 1e-6  # every norm of diffusers' VAE encoder
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
ENCODER_BLOCK = "DownEncoderBlock2D"
# AutoencoderKL settings that would change the latents DP-IQA computes: only these values work.
_FIXED_SETTINGS = {"_class_name": "AutoencoderKL", "act_fn": "silu", "shift_factor": None,
                   "latents_mean": None, "latents_std": None}
# AutoencoderKL keys of the decoder, sizes and bookkeeping: no effect on the encoder.
_IGNORED_KEYS = {"out_channels", "up_block_types", "sample_size", "force_upcast", "use_post_quant_conv"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """From an AutoencoderKL `config.json` dict; raises ValueError naming an unsupported setting."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in _FIXED_SETTINGS:
                if value != _FIXED_SETTINGS[key]:
                    raise ValueError(f"VAE config: {key}={value!r} is not supported "
                                     f"(only {_FIXED_SETTINGS[key]!r})")
            elif key in fields:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key != "down_block_types" and not key.startswith("_") and key not in _IGNORED_KEYS:
                raise ValueError(f"VAE config: unknown key {key!r}")
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        blocks = config.get("down_block_types", [ENCODER_BLOCK] * n)
        if list(blocks) != [ENCODER_BLOCK] * n:
            raise ValueError(f"VAE config: down_block_types={blocks!r} is not supported "
                             f"(only {n} x {ENCODER_BLOCK}, one per block_out_channels entry)")
        return cls(**kwargs)


SD15 = VAEConfig()


class DownEncoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`: resnets, then a stride-2 conv unless it is the last block."""

    config: VAEConfig
    channels: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for j in range(cfg.layers_per_block):
            x = ResnetBlock2D(self.channels, cfg.norm_num_groups, EPS, self.dtype, name=f"resnets.{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, vae_padding=True, dtype=self.dtype, name="downsamplers.0")(x)
        return x


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` without time embedding: resnet, (attention, resnet)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, channels = self.config, x.shape[-1]
        resnet = lambda i: ResnetBlock2D(channels, cfg.norm_num_groups, EPS, self.dtype, name=f"resnets.{i}")
        x = resnet(0)(x)
        if cfg.mid_block_add_attention:
            # diffusers gives the VAE's attention one head spanning all channels: wider than the
            # fused kernels' heads, and run once per image without a backward pass, so XLA's.
            x = Attention(heads=1, dim_head=channels, qkv_bias=True, norm_groups=cfg.norm_num_groups,
                          norm_eps=EPS, dtype=self.dtype, implementation="xla", name="attentions.0")(x)
        return resnet(1)(x)


class Encoder(nn.Module):
    """diffusers `vae.Encoder`: images -> 2 * latent_channels moments (before quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(x)
        last = len(cfg.block_out_channels) - 1
        for i, channels in enumerate(cfg.block_out_channels):
            x = DownEncoderBlock(cfg, channels, i < last, self.dtype, name=f"down_blocks.{i}")(x)
        x = MidBlock(cfg, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, EPS, "conv_norm_out", self.dtype)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class VAEEncoder(nn.Module):
    """images (B, H, W, C) -> posterior (mean, std), each (B, H/f, W/f, latent_channels), float32."""

    config: VAEConfig = SD15
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        moments = Encoder(cfg, self.dtype, name="encoder")(images)
        if cfg.use_quant_conv:
            moments = conv(2 * cfg.latent_channels, 1, "quant_conv", self.dtype)(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        logvar = jnp.clip(logvar, *LOGVAR_RANGE)
        return mean, jnp.exp(0.5 * logvar)


def latents_from_posterior(mean: jax.Array, std: jax.Array, scaling_factor: float,
                           rng: Optional[jax.Array] = None) -> jax.Array:
    """U-Net latents: the scaled posterior mean (rng None), or a scaled draw (the authors' `sample()`)."""
    if rng is None:
        return mean * scaling_factor
    return (mean + std * jax.random.normal(rng, mean.shape, mean.dtype)) * scaling_factor
