"""The SD-1.5 U-Net (diffusers `UNet2DConditionModel`) up to the outputs of its up blocks.

DP-IQA reads the four up blocks' outputs as image features, so the final norm and `conv_out`
are not built. Module names are diffusers' (e.g. `down_blocks.0.attentions.1.proj_in`), so a
diffusers state dict loads by name alone (`dpiqa_jax.weights.torch_names`). Layout is NHWC.
"""
import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.attention import FUSED_FORWARD, Attention
from dpiqa_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm, layer_norm

Dtype = Any
IntOrTuple = Union[int, tuple[int, ...]]

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

# diffusers settings that change the function computed; only their default values are supported.
_FIXED_SETTINGS = {
    "center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
    "upcast_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "attention_type": "default", "cross_attention_norm": None, "act_fn": "silu", "downsample_padding": 1,
    "mid_block_scale_factor": 1.0, "conv_in_kernel": 3, "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
}
# diffusers keys without effect on the up blocks' outputs (the output head, sizes, bookkeeping).
_IGNORED_KEYS = {"sample_size", "out_channels", "conv_out_kernel", "addition_embed_type_num_heads",
                 "mid_block_only_cross_attention"}
# diffusers allows per-block values for these; we support one value for all blocks.
_SINGLE_VALUED = ("layers_per_block", "cross_attention_dim")


def _uniform(value):
    """diffusers accepts a per-block list where one value is meant; a list of equal values is that value."""
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        return value[0]
    return value


def _field_from_json(key: str, value):
    if key in _SINGLE_VALUED:
        if not isinstance(_uniform(value), int):
            raise ValueError(f"UNet config: {key}={value!r} must be one int (the same for every block)")
        return _uniform(value)
    if key == "norm_num_groups" and value is None:
        raise ValueError("UNet config: norm_num_groups=None is not supported")
    return tuple(value) if isinstance(value, list) else value


def _per_block(value, key: str, n: int) -> tuple:
    values = (value,) * n if isinstance(value, int) else value
    values = tuple(values) if isinstance(values, (list, tuple)) else ()
    if len(values) != n or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"UNet config: {key}={value!r} must be a positive int or {n} positive ints")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The settings of a diffusers `UNet2DConditionModel` that this module implements (SD-1/2 style)."""

    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' legacy name: for SD-1.x this is the number of heads per block (head dim = channels // heads).
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None  # wins over attention_head_dim when given
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: IntOrTuple = 1
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    mid_block_type: str = CROSS_MID

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, kinds in (("down_block_types", (CROSS_DOWN, PLAIN_DOWN)),
                           ("up_block_types", (CROSS_UP, PLAIN_UP))):
            types = getattr(self, key)
            if len(types) != n or any(t not in kinds for t in types):
                raise ValueError(f"UNet config: {key}={types!r} must be {n} of {kinds}")
        if self.mid_block_type != CROSS_MID:
            raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported "
                             f"(only {CROSS_MID})")
        self.heads(), self.transformer_layers()  # validate the per-block settings

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def heads(self) -> tuple[int, ...]:
        """Attention heads of each down block (the up blocks use them reversed, the mid block the last)."""
        if self.num_attention_heads is not None:
            return _per_block(self.num_attention_heads, "num_attention_heads", len(self.block_out_channels))
        return _per_block(self.attention_head_dim, "attention_head_dim", len(self.block_out_channels))

    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, "transformer_layers_per_block",
                          len(self.block_out_channels))

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict; raises ValueError naming an unsupported setting."""
        kwargs = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _FIXED_SETTINGS:
                if _uniform(value) != _FIXED_SETTINGS[key]:
                    raise ValueError(f"UNet config: {key}={value!r} is not supported "
                                     f"(only {_FIXED_SETTINGS[key]!r})")
            elif key in fields:
                kwargs[key] = _field_from_json(key, value)
            else:
                raise ValueError(f"UNet config: unknown key {key!r}")
        kwargs.setdefault("cross_attention_dim", 1280)  # diffusers' default, unlike ours (SD-1.5's 768)
        return cls(**kwargs)


SD15 = UNetConfig()


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' `get_timestep_embedding` (max period 10000, scale 1), in float32 like diffusers."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-norm."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # the kernel (attention.IMPLEMENTATIONS)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        norm = lambda name: layer_norm(1e-5, name, self.dtype)
        attention = lambda name: Attention(self.heads, self.dim_head, dtype=self.dtype,
                                           implementation=self.attention, name=name)
        x = x + attention("attn1")(norm("norm1")(x))
        x = x + attention("attn2")(norm("norm2")(x), context)
        hidden = nn.Dense(2 * 4 * dim, dtype=self.dtype, name="ff.net.0.proj")(norm("norm3")(x))
        hidden, gate = jnp.split(hidden, 2, axis=-1)
        hidden = hidden * nn.gelu(gate, approximate=False)
        return x + nn.Dense(dim, dtype=self.dtype, name="ff.net.2")(hidden)


class Transformer2D(nn.Module):
    """diffusers `Transformer2DModel` on continuous (B, H, W, C) input, with a residual connection."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def _projection(self, features: int, name: str) -> nn.Module:
        # A 1x1 conv (SD-1) and a Linear (SD-2) compute the same map; they differ in parameter shape.
        if self.linear_projection:
            return nn.Dense(features, dtype=self.dtype, name=name)
        return conv(features, 1, name, self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        dim_head = channels // self.heads
        inner = self.heads * dim_head
        h = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        h = self._projection(inner, "proj_in")(h).reshape(batch, height * width, inner)
        for k in range(self.layers):
            h = TransformerBlock(self.heads, dim_head, self.dtype, self.attention,
                                 name=f"transformer_blocks.{k}")(h, context)
        h = self._projection(channels, "proj_out")(h.reshape(batch, height, width, inner))
        return h + x


def _saves_matmul_outputs(primitive, *_, **params) -> bool:
    """A checkpoint policy: keep the outputs of convolutions, of matrix products without batch
    dimensions (the dense layers) and of the fused attention kernels' forward pass (their output and
    softmax statistics, which their backward pass reads: else the kernel runs again); recompute the
    rest from them."""
    return (primitive.name in ("conv_general_dilated", *FUSED_FORWARD)
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(primitive, **params))


def _remat(policy=None) -> tuple:
    return nn.remat(ResnetBlock2D, policy=policy), nn.remat(Transformer2D, policy=policy)


# What the U-Net's resnets and transformers keep for the backward pass (`model.remat`), per image
# at SD-1.5's size in bfloat16 (the jaxpr's saved residuals, benchmarks/memory.py):
#   'off'      every intermediate: 7.7 GiB with XLA's attention, 5.8 of them its probabilities
#              (about 1.9 without them, as with a fused kernel);
#   'matmuls'  the outputs of the convolutions, dense layers and fused attention kernels only
#              (0.54 GiB with XLA's attention, 0.59 with cuDNN's): norms, activations, casts and
#              XLA's attention probabilities run again in the backward pass;
#   'full'     each layer's inputs only (0.17 GiB): the whole layer runs again.
_LAYERS = {"off": (ResnetBlock2D, Transformer2D), "matmuls": _remat(_saves_matmul_outputs), "full": _remat()}
REMAT = tuple(_LAYERS)


class _Block(nn.Module):
    """Shared part of the down, mid and up blocks: their settings are those of down block `index`."""

    config: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    remat: str = "off"
    attention: str = "auto"

    @property
    def channels(self) -> int:
        return self.config.block_out_channels[self.index]

    def resnet_attention(self, j: int, x, temb, context, attention: bool):
        cfg, i = self.config, self.index
        resnet, transformer = _LAYERS[self.remat]
        x = resnet(self.channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name=f"resnets.{j}")(x, temb)
        if attention:
            x = transformer(cfg.heads()[i], cfg.transformer_layers()[i], cfg.norm_num_groups,
                            cfg.use_linear_projection, self.dtype, self.attention,
                            name=f"attentions.{j}")(x, context)
        return x


class DownBlock(_Block):
    """`CrossAttnDownBlock2D` / `DownBlock2D`; returns (output, skips saved for the up path).

    The adapter residual is added as diffusers' `down_intrablock_additional_residuals`: after the
    last resnet+attention pair (before the downsampler) in a cross-attention block; to the block
    output in a plain block, whose last skip is the same tensor there (diffusers adds in place).
    """

    @nn.compact
    def __call__(self, x, temb, context, residual: Optional[jax.Array] = None):
        attention = self.config.down_block_types[self.index] == CROSS_DOWN
        layers = self.config.layers_per_block
        skips = []
        for j in range(layers):
            x = self.resnet_attention(j, x, temb, context, attention)
            if attention and residual is not None and j == layers - 1:
                x = x + residual
            skips.append(x)
        if self.index < len(self.config.block_out_channels) - 1:
            x = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers.0")(x)
            skips.append(x)
        if not attention and residual is not None:
            x = x + residual
            skips[-1] = x
        return x, skips


class MidBlock(_Block):
    """`UNetMidBlock2DCrossAttn` with one transformer: resnet, attention, resnet."""

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet_attention(0, x, temb, context, attention=True)
        return self.resnet_attention(1, x, temb, context, attention=False)


class UpBlock(_Block):
    """`CrossAttnUpBlock2D` / `UpBlock2D`: resnet j takes skips[-1 - j] concatenated on channels.

    `index` is the mirrored down block; `up_index` its position among the up blocks.
    """

    up_index: int = 0

    @nn.compact
    def __call__(self, x, temb, context, skips: Sequence[jax.Array]):
        attention = self.config.up_block_types[self.up_index] == CROSS_UP
        for j, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = self.resnet_attention(j, x, temb, context, attention)
        if self.index > 0:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers.0")(x)
        return x


class UNetFeatures(nn.Module):
    """The U-Net from `conv_in` to the up blocks; returns their outputs [u0, ..., u_{n-1}] (NHWC).

    latents (B, h, w, in_channels); timesteps (B,) or a scalar; context (B or 1, S, cross_attention_dim):
    a batch-1 context is shared by every image; adapter_residuals: one NHWC tensor per down block
    (T2I-Adapter), or None for the plain U-Net. `remat` (`REMAT`) says what each resnet and
    transformer keeps for the backward pass and what it computes again there: memory for compute.
    `attention` picks the attention kernel (`attention.IMPLEMENTATIONS`).
    """

    config: UNetConfig = SD15
    dtype: Dtype = jnp.float32
    remat: str = "off"
    attention: str = "auto"

    @nn.compact
    def __call__(self, latents: jax.Array, timesteps, context: jax.Array,
                 adapter_residuals: Optional[Sequence[jax.Array]] = None) -> list[jax.Array]:
        cfg, n = self.config, len(self.config.block_out_channels)
        self._check_inputs(latents, context, adapter_residuals)
        t = jnp.broadcast_to(jnp.asarray(timesteps), (latents.shape[0],))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = nn.Dense(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding.linear_1")(temb)
        temb = nn.Dense(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding.linear_2")(nn.silu(temb))

        x = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(latents)
        skips = [x]
        for i in range(n):
            residual = None if adapter_residuals is None else adapter_residuals[i]
            block = DownBlock(cfg, i, self.dtype, self.remat, self.attention, name=f"down_blocks.{i}")
            x, block_skips = block(x, temb, context, residual)
            skips += block_skips
        x = MidBlock(cfg, n - 1, self.dtype, self.remat, self.attention, name="mid_block")(x, temb, context)
        outputs = []
        per_block = cfg.layers_per_block + 1
        for i in range(n):
            skips, block_skips = skips[:-per_block], skips[-per_block:]
            block = UpBlock(cfg, n - 1 - i, self.dtype, self.remat, self.attention, up_index=i,
                            name=f"up_blocks.{i}")
            x = block(x, temb, context, block_skips)
            outputs.append(x)
        return outputs

    def _check_inputs(self, latents, context, adapter_residuals):
        cfg, n = self.config, len(self.config.block_out_channels)
        factor = 2 ** (n - 1)
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels or latents.shape[1] % factor \
                or latents.shape[2] % factor:
            raise ValueError(f"UNet latents: shape {latents.shape} must be (B, h, w, {cfg.in_channels}) "
                             f"with h and w multiples of {factor}")
        if context.ndim != 3 or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet context: shape {context.shape} must be "
                             f"(B or 1, S, {cfg.cross_attention_dim})")
        if adapter_residuals is None:
            return
        b, h, w = latents.shape[:3]
        # Where each down block adds its residual: before its downsampler if it has attention.
        scales = [2**i if t == CROSS_DOWN or i == n - 1 else 2 ** (i + 1)
                  for i, t in enumerate(cfg.down_block_types)]
        expected = [(b, h // s, w // s, c) for s, c in zip(scales, cfg.block_out_channels, strict=True)]
        shapes = [tuple(r.shape) for r in adapter_residuals]
        if shapes != expected:
            raise ValueError(f"UNet adapter residuals: shapes {shapes} must be {expected}")
