"""Multi-head attention with diffusers' `Attention` parameter names.

Keys and values may come from a context whose batch dimension is 1 (DP-IQA's prompt
embeddings are the same for every image): they are then projected once and broadcast,
instead of once per image.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.layers import group_norm

Dtype = Any


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
        out = jax.nn.dot_product_attention(q, k, v).reshape(batch, -1, inner)
        out = nn.Dense(channels, dtype=self.dtype, name="to_out.0")(out)
        if self.norm_groups is not None:
            out = out.reshape(spatial_shape) + residual
        return out
