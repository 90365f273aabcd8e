"""Multi-head attention with diffusers' `Attention` parameter names, and its kernels.

Keys and values may come from a context whose batch dimension is 1 (DP-IQA's prompt
embeddings are the same for every image): they are then projected once and broadcast,
instead of once per image.

Kernels (`IMPLEMENTATIONS`, config key `model.attention`): 'xla' is `jax.nn.dot_product_attention`
as XLA fuses it on any backend; 'cudnn' is cuDNN's fused flash attention (NVIDIA GPUs, float16 or
bfloat16); 'tpu_flash' is the Pallas flash-attention kernel for TPUs, where the queries fill its
blocks (XLA's elsewhere; keys are padded to its block and masked out, so any context length works).
Only 'xla' holds the (T, S) probabilities of a whole sequence in memory. 'auto' picks cuDNN on a
GPU in half precision for heads it takes (XLA's kernel for others, and with a warning wherever cuDNN
turns a shape down when traced), 'tpu_flash' on a TPU, XLA elsewhere.
"""
import dataclasses
import warnings
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.layers import group_norm

Dtype = Any
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tpu_flash")
TPU_BLOCK = 128  # the Pallas kernel's query and key block: queries must fill whole blocks
HALF = (jnp.float16, jnp.bfloat16)
CUDNN_HEADS = 256  # the widest head cuDNN's flash attention takes (Hopper; earlier cards 128)
# What a remat policy (unet.REMAT) sees of the fused kernels' forward pass: cuDNN's kernel itself,
# and the custom VJP around Pallas' (the U-Net's layers have no other custom VJP).
FUSED_FORWARD = ("dot_product_attention_fwd_wrapper", "custom_vjp_call")


def choose(implementation: str, platform: str, dtype, query_length: int, head_size: int) -> str:
    """The kernel that `implementation` means for one call on `platform` ('cpu', 'gpu', 'tpu')."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; known: {IMPLEMENTATIONS}")
    if implementation == "auto":
        # cuDNN's kernel is for half precision, on heads at most CUDNN_HEADS wide in steps of 8 (the
        # VAE's one head of 512 is not: XLA's kernel, without the warning of a surprise refusal).
        cudnn = jnp.dtype(dtype) in HALF and head_size <= CUDNN_HEADS and head_size % 8 == 0
        implementation = {"gpu": "cudnn" if cudnn else "xla", "tpu": "tpu_flash"}.get(platform, "xla")
    if implementation == "tpu_flash" and query_length % TPU_BLOCK:
        return "xla"  # short sequences (the U-Net's deeper levels) cost little either way
    return implementation


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per head: q (B, T, H, D), k and v (B, S, H, D) -> (B, T, H, D)."""
    kernel = choose(implementation, jax.default_backend(), q.dtype, q.shape[1], q.shape[3])
    if kernel == "tpu_flash":
        return tpu_flash_attention(q, k, v)
    if kernel == "cudnn":
        try:  # cuDNN checks shapes, head sizes and its version when traced
            return cudnn_attention(q, k, v)
        except (RuntimeError, NotImplementedError, ValueError) as refusal:
            if implementation != "auto":
                raise
            # Said once per shape and reason (at trace time): a slower kernel should never be silent.
            heads = f"{q.shape[2]} head{'s' * (q.shape[2] != 1)} of {q.shape[3]}"
            warnings.warn(f"attention of {q.shape[1]} queries on {k.shape[1]} keys ({heads}) runs on XLA's "
                          f"kernel: cuDNN's refused it ({refusal})", stacklevel=2)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")  # None may mean cuDNN one day


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN's fused kernel on (B, T, H, D) inputs. Its training path in JAX turns down an odd number
    of keys (SD-1.5's 1485 prompts), which would leave every cross-attention of the train step on
    XLA's kernel: those keys get one more, a zero one that the keys' length masks out."""
    keys = k.shape[1]
    if keys % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    lengths = jnp.full((q.shape[0],), keys, jnp.int32)
    return jax.nn.dot_product_attention(q, pad(k), pad(v), key_value_seq_lengths=lengths,
                                        implementation="cudnn")


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas TPU kernel on (B, T, H, D) inputs, T a multiple of TPU_BLOCK. The keys are padded
    to one with zeros that segment ids keep out of every query's softmax."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas

    batch, length = q.shape[:2]
    keys = k.shape[1]
    pad = -keys % TPU_BLOCK
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    segments = pallas.SegmentIds(q=jnp.ones((batch, length), jnp.int32),
                                 kv=jnp.broadcast_to(jnp.arange(keys + pad) < keys, (batch, keys + pad))
                                 .astype(jnp.int32))
    sizes = {f.name: TPU_BLOCK for f in dataclasses.fields(pallas.BlockSizes)}
    blocks = pallas.BlockSizes(**sizes | {"block_b": 1})
    out = pallas.flash_attention(q.transpose(0, 2, 1, 3), heads_first(k), heads_first(v),
                                 segment_ids=segments, sm_scale=q.shape[-1] ** -0.5, block_sizes=blocks)
    return out.transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """q/k/v projections, scaled dot-product attention over `heads` heads, output projection.

    `x` is (B, T, C); `context` is (B or 1, S, D), or None for self-attention.
    `norm_groups` adds the VAE's GroupNorm (`group_norm`) on a spatial (B, H, W, C) input
    together with its residual connection.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    implementation: str = "auto"  # the kernel (IMPLEMENTATIONS)

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        residual = x
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, "group_norm", self.dtype)(x)
        spatial_shape = x.shape
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        batch, channels = x.shape[0], x.shape[-1]
        inner = self.heads * self.dim_head
        context = x if context is None else context

        def project(name, tokens):
            y = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(tokens)
            y = y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)
            return jnp.broadcast_to(y, (batch,) + y.shape[1:])

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = attend(q, k, v, self.implementation).reshape(batch, -1, inner)
        out = nn.Dense(channels, dtype=self.dtype, name="to_out.0")(out)
        if self.norm_groups is not None:
            out = out.reshape(spatial_shape) + residual
        return out
