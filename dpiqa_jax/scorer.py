"""Scoring images with a teacher or a student checkpoint: the Python API behind `dpiqa-jax predict`.

    scorer = dpiqa_jax.scorer.load("koniq_teacher.pth", prompt_embeddings="quality_embeddings.pth")
    scorer = dpiqa_jax.scorer.load("koniq_student.msgpack")  # a student needs nothing else
    scores = scorer(["a.jpg", "b.png"])
"""
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.data.images import load_image
from dpiqa_jax.errors import UserError
from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
from dpiqa_jax.student_io import StudentSpec, Variables, is_student_checkpoint, load_student, student_apply


class Scorer:
    """Batched inference of a model; scores are in the checkpoint's own scale: every model here
    (the authors' and ours) learns its dataset's label on 0-1 (MOS / 100 for the real datasets,
    SSIM for synthetic_iqa), so about 0 (worst) to 1 (best), higher is better.

    `predict(images, start)` -> (scores, maps) runs one batch of exactly `batch_size` images (the
    last batch is padded, so one compiled program serves all); `start` is its first image's index."""

    score_range = (0.0, 1.0)  # scores may stray a little outside it
    lower_better = False

    def __init__(self, predict: Callable, image_size: int, batch_size: int = 8):
        self.predict, self.image_size, self.batch_size = predict, image_size, batch_size

    def describe_range(self) -> str:
        low, high = self.score_range
        better = "lower" if self.lower_better else "higher"
        return f"about {low:g} to {high:g} (the training label: MOS / 100), {better} is better"

    def predict_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), feature maps (N, m, m, 8)) of preprocessed images (N, S, S, 3) in [0, 1]."""
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)])
            score, fmap = self.predict(padded, start)
            scores.append(np.asarray(score)[:n])
            maps.append(np.asarray(fmap)[:n])
        return np.concatenate(scores), np.concatenate(maps)

    def __call__(self, images: Sequence) -> np.ndarray:
        """Scores of image paths or of (S, S, 3) arrays already preprocessed."""
        return self.predict_arrays(self.load(images))[0]

    def feature_maps(self, images: Sequence) -> np.ndarray:
        """Quality feature maps (N, m, m, 8) of image paths or preprocessed arrays
        (`dpiqa_jax.heatmaps.render` draws them)."""
        return self.predict_arrays(self.load(images))[1]

    def load(self, images: Sequence) -> np.ndarray:
        """Paths (or os.PathLike) read as the model expects; arrays taken as already preprocessed."""
        return np.stack([load_image(x, self.image_size) if isinstance(x, (str, os.PathLike))
                         else np.asarray(x, np.float32) for x in images])


def teacher_scorer(cfg: TeacherConfig, params, embeddings, *, latent: str = "mean", batch_size: int = 8,
                   seed: int = 0, dtype=jnp.float32) -> Scorer:
    """`latent='mean'` uses the VAE posterior mean (deterministic); `'sample'` draws as the authors do,
    from a key derived from `seed` and the batch's first image index."""
    if latent not in ("mean", "sample"):
        raise ValueError(f"latent must be 'mean' or 'sample', not {latent!r}")
    model = DPIQA(cfg, dtype=dtype)
    apply = jax.jit(lambda p, x, e, rng: model.apply({"params": p}, x, e, rng))
    embeddings, key = jnp.asarray(embeddings, jnp.float32), jax.random.PRNGKey(seed)

    def predict(images, start):
        rng = jax.random.fold_in(key, start) if latent == "sample" else None
        return apply(params, images, embeddings, rng)

    return Scorer(predict, cfg.image_size, batch_size)


def student_scorer(spec: StudentSpec, variables: Variables, *, batch_size: int = 8,
                   dtype=jnp.float32) -> Scorer:
    apply = student_apply(spec, dtype)
    return Scorer(lambda images, start: apply(variables, images), spec.image_size, batch_size)


def refuse_teacher_options(checkpoint: str, prompt_embeddings, model_config, latent: str) -> None:
    teacher_only = {"prompt embeddings": prompt_embeddings, "a teacher model config": model_config,
                    "sampled latents": latent != "mean"}
    given = [name for name, value in teacher_only.items() if value]
    if given:
        raise UserError(f"{checkpoint} is a student checkpoint: {' and '.join(given)} apply to teachers only")


def load(checkpoint, prompt_embeddings: Optional[str] = None, model_config: Optional[str] = None, *,
         student_spec: Optional[StudentSpec] = None, latent: str = "mean", batch_size: int = 8, seed: int = 0,
         dtype=jnp.float32) -> Scorer:
    """A Scorer for a student (see `student_io.is_student_checkpoint`; `student_spec` describes an
    authors' file whose shapes are not B7 at 512 px) or else a teacher (see `teacher.load_teacher`)."""
    from dpiqa_jax.teacher import load_teacher

    checkpoint = os.fspath(checkpoint)
    if is_student_checkpoint(checkpoint):
        refuse_teacher_options(checkpoint, prompt_embeddings, model_config, latent)
        spec, variables = load_student(checkpoint, student_spec)
        return student_scorer(spec, variables, batch_size=batch_size, dtype=dtype)
    if student_spec is not None:
        raise UserError(f"{checkpoint} is not a student checkpoint: a student spec does not apply")
    cfg, params, embeddings = load_teacher(checkpoint, prompt_embeddings, model_config)
    return teacher_scorer(cfg, params, embeddings, latent=latent, batch_size=batch_size, seed=seed,
                          dtype=dtype)
