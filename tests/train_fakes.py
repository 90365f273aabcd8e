"""A stand-in teacher for the step and sharding tests: the DPIQA interface (`encode`,
`from_latents`, `config.vae.scaling_factor`, a frozen `vae` subtree) on a model that compiles in
a second, so the step's logic is tested apart from the real model's compile time."""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class FakeVAEConfig:
    scaling_factor: float = 0.5


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    vae: FakeVAEConfig = FakeVAEConfig()


class FakeTeacher(nn.Module):
    config: FakeConfig = FakeConfig()
    dtype: Any = jnp.float32

    def setup(self):
        self.vae = nn.Dense(8, dtype=self.dtype, name="vae")
        self.body = nn.Dense(16, dtype=self.dtype, name="body")
        self.head = nn.Dense(1, dtype=self.dtype, name="head")

    def encode(self, images):
        moments = self.vae(images.reshape(images.shape[0], -1)).astype(jnp.float32)
        mean, log_std = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.1 * log_std)

    def from_latents(self, images, latents, embeddings):
        context = jnp.mean(embeddings) * jnp.ones((images.shape[0], 1))
        pooled = jnp.mean(images, axis=(1, 2))
        h = nn.relu(self.body(jnp.concatenate([latents, pooled, context], axis=-1)))
        return self.head(h)[:, 0], h

    def __call__(self, images, embeddings):
        mean, _ = self.encode(images)
        return self.from_latents(images, mean * self.config.vae.scaling_factor, embeddings)


def fake_params(seed: int = 0, image_size: int = 8):
    images = jnp.zeros((2, image_size, image_size, 3))
    return FakeTeacher().init(jax.random.PRNGKey(seed), images, jnp.zeros((4, 8)))["params"]


def fake_batch(n: int = 16, image_size: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, image_size, image_size, 3)).astype(np.float32)
    return {"image": images, "target": images.mean(axis=(1, 2, 3)) * 2 - 0.5,
            "index": np.arange(n, dtype=np.int32)}


def adam():
    return optax.adam(1e-2)


class FakeStudent(nn.Module):
    """The Student interface (`apply(variables, images, train=...)` -> (score, map), batch statistics,
    dropout) with maps shaped as FakeTeacher's."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        h = nn.Dense(16, name="body")(jnp.mean(images, axis=(1, 2)))
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(h)
        h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
        return nn.Dense(1, name="head")(h)[:, 0], h
