"""Scoring images with a teacher checkpoint: the Python API behind `dpiqa-jax predict`.

    scorer = dpiqa_jax.scorer.load("koniq_teacher.pth", prompt_embeddings="quality_embeddings.pth")
    scores = scorer(["a.jpg", "b.png"])
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.data.images import load_image
from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig


class Scorer:
    """Batched, jitted teacher inference. Scores are in the checkpoint's own scale.

    `latent='mean'` uses the VAE posterior mean (deterministic); `'sample'` draws as the
    authors do, from a key derived from `seed` and the batch number."""

    def __init__(self, cfg: TeacherConfig, params, embeddings, *, latent: str = "mean",
                 batch_size: int = 8, seed: int = 0, dtype=jnp.float32):
        if latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', not {latent!r}")
        self.cfg, self.params, self.batch_size = cfg, params, batch_size
        self.embeddings = jnp.asarray(embeddings, jnp.float32)
        self.latent, self.key = latent, jax.random.PRNGKey(seed)
        model = DPIQA(cfg, dtype=dtype)
        self._apply = jax.jit(lambda p, x, e, rng: model.apply({"params": p}, x, e, rng))

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), feature maps (N, m, m, 8)) of preprocessed images (N, S, S, 3) in [0, 1]."""
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)])
            rng = jax.random.fold_in(self.key, start) if self.latent == "sample" else None
            score, fmap = self._apply(self.params, padded, self.embeddings, rng)
            scores.append(np.asarray(score)[:n])
            maps.append(np.asarray(fmap)[:n])
        return np.concatenate(scores), np.concatenate(maps)

    def __call__(self, images: Sequence) -> np.ndarray:
        """Scores of image paths or of (S, S, 3) arrays already preprocessed."""
        arrays = np.stack([load_image(x, self.image_size) if isinstance(x, str) else np.asarray(x, np.float32)
                           for x in images])
        return self.predict_arrays(arrays)[0]


def load(checkpoint: str, prompt_embeddings: Optional[str] = None, model_config: Optional[str] = None,
         **kwargs) -> Scorer:
    """A Scorer from a teacher state-dict file (the authors' `.pth`) (see `teacher.load_teacher`)."""
    from dpiqa_jax.teacher import load_teacher

    cfg, params, embeddings = load_teacher(checkpoint, prompt_embeddings, model_config)
    return Scorer(cfg, params, embeddings, **kwargs)
