"""CLIP's text tower with its projection: transformers' `CLIPModel.get_text_features`.

Parameter names are CLIPModel's (`text_model.embeddings...`, `text_model.encoder.layers.{i}...`,
`text_projection`), so a CLIPModel or CLIPTextModelWithProjection state dict loads by name.
DP-IQA uses it once, offline, to embed its 1485 quality prompts.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.layers import layer_norm

Dtype = Any
LEGACY_EOS_ID = 2  # configs older than transformers PR #24773 (e.g. openai/clip-vit-large-patch14)
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults are transformers' CLIPTextConfig defaults (config.json files may omit them)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 49407

    @classmethod
    def from_transformers(cls, config: dict) -> "CLIPTextConfig":
        """From a CLIPModel `config.json` dict (text part) or a CLIPTextConfig dict."""
        text = dict(config)
        if "text_config" in config or "text_config_dict" in config:
            # As transformers does, `text_config_dict` (older files) overrides `text_config`;
            # the projection size of a CLIPModel is its top-level `projection_dim`.
            text = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
            text["projection_dim"] = config.get("projection_dim", cls.projection_dim)
        if text.get("hidden_act", cls.hidden_act) not in ACTIVATIONS:
            raise ValueError(f"CLIP text config: hidden_act={text['hidden_act']!r} is not supported "
                             f"(only {' or '.join(ACTIVATIONS)})")
        if not isinstance(text.get("eos_token_id", cls.eos_token_id), int):
            raise ValueError(f"CLIP text config: eos_token_id={text['eos_token_id']!r} must be one int")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in text.items() if k in fields})


VIT_L14 = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                         eos_token_id=LEGACY_EOS_ID)  # openai/clip-vit-large-patch14


class CLIPAttention(nn.Module):
    """Multi-head self-attention with CLIP's q/k/v/out_proj names; `mask` (B, 1, L, L) is boolean."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        batch, length, dim = x.shape

        def project(name):
            y = nn.Dense(dim, dtype=self.dtype, name=name)(x)
            return y.reshape(batch, length, self.heads, dim // self.heads)

        out = jax.nn.dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"), mask=mask)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out.reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", self.dtype)(x)
        x = x + CLIPAttention(cfg.num_attention_heads, self.dtype, name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", self.dtype)(x)
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="mlp.fc1")(h)
        h = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="mlp.fc2")(ACTIVATIONS[cfg.hidden_act](h))
        return x + h


class TextTransformer(nn.Module):
    """transformers `CLIPTextTransformer`: token ids -> final-layer-normed hidden states."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        cfg, length = self.config, input_ids.shape[1]
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype, name=f"embeddings.{name}")
        x = embed(cfg.vocab_size, "token_embedding")(input_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embedding")(jnp.arange(length))[None]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, self.dtype, name=f"encoder.layers.{i}")(x, mask)
        return layer_norm(cfg.layer_norm_eps, "final_layer_norm", self.dtype)(x)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The pooled token of each sequence, chosen exactly as transformers chooses it."""
    if eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(input_ids, axis=-1)  # the EOS id is the largest of the original vocabulary
    return jnp.argmax(input_ids == eos_token_id, axis=-1)  # the first EOS (padding may repeat it)


class CLIPTextWithProjection(nn.Module):
    """input_ids (B, L) -> projected pooled text features (B, projection_dim), not normalised."""

    config: CLIPTextConfig = VIT_L14
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden = TextTransformer(self.config, self.dtype, name="text_model")(input_ids, attention_mask)
        pooled = hidden[jnp.arange(hidden.shape[0]), eos_positions(input_ids, self.config.eos_token_id)]
        cfg = self.config
        return nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
