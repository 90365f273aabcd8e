"""The DP-IQA teacher: VAE encoder -> U-Net (text + image adapters) -> quality feature decoder.

Parameter tree (names as the authors' state dict): `vae`, `unet`, `img_adapter`,
`text_adapter`, `gamma`, `QFD`. The VAE is frozen; training takes gradients of the rest.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpiqa_jax.models.adapters import ImageAdapter, TextAdapter
from dpiqa_jax.models.decoder import QualityFeatureDecoder
from dpiqa_jax.models.unet import SD15 as UNET_SD15
from dpiqa_jax.models.unet import UNetConfig, UNetFeatures
from dpiqa_jax.models.vae import SD15 as VAE_SD15
from dpiqa_jax.models.vae import VAEConfig, VAEEncoder, latents_from_posterior

TIMESTEP = 1  # the authors run the U-Net at t = 1 with no noise added


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    unet: UNetConfig = UNET_SD15
    vae: VAEConfig = VAE_SD15
    latent_size: int = 64  # latent side = quality map side; the input side is latent_size * downscale
    adapter_res_blocks: int = 2
    decoder: tuple = ()  # QualityFeatureDecoder widths as (name, value) pairs; empty = the authors'

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return self.latent_size * self.downscale

    @property
    def embed_dim(self) -> int:
        return self.unet.cross_attention_dim


class DPIQA(nn.Module):
    """images (B, H, W, 3) in [0, 1] -> (score (B,), quality feature map (B, m, m, 8)).
    `remat`: what the U-Net's layers keep for the backward pass (`unet.REMAT`);
    `attention`: the U-Net's attention kernel (`attention.IMPLEMENTATIONS`)."""

    config: TeacherConfig = TeacherConfig()
    dtype: Any = jnp.float32
    remat: str = "off"
    attention: str = "auto"

    def setup(self):
        cfg = self.config
        self.vae = VAEEncoder(cfg.vae, dtype=self.dtype)
        self.img_adapter = ImageAdapter(channels=tuple(cfg.unet.block_out_channels),
                                        num_res_blocks=cfg.adapter_res_blocks,
                                        downscale_factor=cfg.downscale, dtype=self.dtype)
        self.text_adapter = TextAdapter(cfg.embed_dim, dtype=self.dtype)
        self.gamma = self.param("gamma", nn.initializers.constant(1e-4), (cfg.embed_dim,))
        self.unet = UNetFeatures(cfg.unet, dtype=self.dtype, remat=self.remat, attention=self.attention)
        self.QFD = QualityFeatureDecoder(map_size=cfg.latent_size, dtype=self.dtype, **dict(cfg.decoder))

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The frozen VAE's posterior (mean, std), unscaled, NHWC."""
        return self.vae(images)

    def adapt_prompts(self, embeddings: jax.Array) -> jax.Array:
        """E' = E + gamma * MLP(E): the U-Net's cross-attention context, shared by the batch."""
        return embeddings + self.gamma * self.text_adapter(embeddings)

    def from_latents(self, images, latents, embeddings):
        """Everything after the VAE: `latents` are already scaled by the VAE scaling factor."""
        context = self.adapt_prompts(embeddings.astype(jnp.float32))[None]
        residuals = self.img_adapter(images)
        timesteps = jnp.full((images.shape[0],), TIMESTEP, jnp.float32)
        u0, u1, u2, u3 = self.unet(latents, timesteps, context, residuals)
        return self.QFD([u3, u2, u1, u0])

    def __call__(self, images, embeddings, rng: Optional[jax.Array] = None):
        """`rng=None` uses the posterior mean (deterministic); a key draws a sample (the authors' way)."""
        mean, std = self.encode(images)
        latents = latents_from_posterior(mean, std, self.config.vae.scaling_factor, rng)
        return self.from_latents(images, latents, embeddings)
