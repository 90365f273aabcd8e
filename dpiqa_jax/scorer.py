"""Scoring images with a teacher or a student checkpoint: the Python API behind `dpiqa-jax predict`.

    scorer = dpiqa_jax.scorer.load("koniq_teacher.pth", prompt_embeddings="quality_embeddings.pth")
    scorer = dpiqa_jax.scorer.load("koniq_student.msgpack")  # a student needs nothing else
    scores = scorer(["a.jpg", "b.png"])
"""
import os
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.data.images import ImageError, load_image
from dpiqa_jax.data.pipeline import ParallelBatches
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

    def predict_arrays(self, images: np.ndarray, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(scores (N,), feature maps (N, m, m, 8)) of preprocessed images (N, S, S, 3) in [0, 1];
        `first` is the index of images[0] among all inputs (it keys the sampled latents)."""
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)])
            score, fmap = self.predict(padded, first + start)
            scores.append(np.asarray(score)[:n])
            maps.append(np.asarray(fmap)[:n])
        return np.concatenate(scores), np.concatenate(maps)

    def batches(self, images: Sequence, on_error: Optional[Callable[[object, str], None]] = None
                ) -> Iterator[tuple[list, np.ndarray, np.ndarray, np.ndarray]]:
        """(inputs, their arrays, scores, maps) per batch of `batch_size` inputs (image paths or
        preprocessed (S, S, 3) arrays). Paths are decoded on a pool of threads a few batches ahead of
        the model, and only a few batches are in memory at once, so any number of files streams
        through. An unreadable file raises its ImageError, or, given `on_error`, is passed to
        `on_error(path, message)` and left out of its batch."""
        items = _nonempty(images)
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        loaded = ParallelBatches(chunks, self._reader(on_error is not None))
        try:
            for number, (chunk, batch) in enumerate(zip(chunks, loaded, strict=True)):
                for item, message in zip(chunk, batch["error"], strict=True):
                    if message:
                        on_error(item, str(message))
                kept = batch["error"] == ""
                if kept.any():
                    arrays = batch["image"][kept]
                    yield [x for x, keep in zip(chunk, kept, strict=True) if keep], arrays, \
                        *self.predict_arrays(arrays, number * self.batch_size)
        finally:
            loaded.close()

    def _reader(self, keep_going: bool) -> Callable:
        """input -> {'image', 'error'}: a path read as the model expects (a blank and the message when
        it is unreadable and `keep_going`), an array taken as already preprocessed."""
        blank = np.zeros((self.image_size, self.image_size, 3), np.float32)

        def read(item) -> dict:
            if not isinstance(item, (str, os.PathLike)):
                return {"image": np.asarray(item, np.float32), "error": ""}
            try:
                return {"image": load_image(item, self.image_size), "error": ""}
            except ImageError as e:
                if not keep_going:
                    raise
                return {"image": blank, "error": str(e)}

        return read

    def __call__(self, images: Sequence) -> np.ndarray:
        """Scores of image paths or of (S, S, 3) arrays already preprocessed."""
        return np.concatenate([scores for _, _, scores, _ in self.batches(images)])

    def feature_maps(self, images: Sequence) -> np.ndarray:
        """Quality feature maps (N, m, m, 8) of image paths or preprocessed arrays
        (`dpiqa_jax.heatmaps.render` draws them)."""
        return np.concatenate([maps for _, _, _, maps in self.batches(images)])

    def load(self, images: Sequence) -> np.ndarray:
        """Paths (or os.PathLike) read as the model expects, on a pool of threads; arrays taken as
        already preprocessed."""
        loaded = ParallelBatches([_nonempty(images)], self._reader(False))
        try:
            return next(loaded)["image"]
        finally:
            loaded.close()


def _nonempty(images: Sequence) -> list:
    items = list(images)
    if not items:
        raise UserError("no images given")
    return items


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


class Checkpoint(NamedTuple):
    """A loaded teacher (TeacherConfig, params, prompt matrix) or student (StudentSpec, variables, None)."""
    config: Union[TeacherConfig, StudentSpec]
    weights: dict
    embeddings: Optional[np.ndarray]

    @property
    def is_student(self) -> bool:
        return isinstance(self.config, StudentSpec)

    @property
    def image_size(self) -> int:
        return self.config.image_size


def read_checkpoint(checkpoint, prompt_embeddings: Optional[str] = None, model_config: Optional[str] = None,
                    *, student_spec: Optional[StudentSpec] = None, latent: str = "mean") -> Checkpoint:
    """A student (see `student_io.is_student_checkpoint`; `student_spec` describes an authors' file whose
    shapes are not B7 at 512 px) or else a teacher (see `teacher.load_teacher`); options that apply to
    the other kind are a one-line error."""
    from dpiqa_jax.teacher import load_teacher

    checkpoint = os.fspath(checkpoint)
    if is_student_checkpoint(checkpoint):
        teacher_only = {"prompt embeddings": prompt_embeddings, "a teacher model config": model_config,
                        "sampled latents": latent != "mean"}
        given = [name for name, value in teacher_only.items() if value]
        if given:
            raise UserError(f"{checkpoint} is a student checkpoint: {' and '.join(given)} apply to teachers "
                            "only")
        return Checkpoint(*load_student(checkpoint, student_spec), None)
    if student_spec is not None:
        raise UserError(f"{checkpoint} is not a student checkpoint: a student spec does not apply")
    return Checkpoint(*load_teacher(checkpoint, prompt_embeddings, model_config))


def load(checkpoint, prompt_embeddings: Optional[str] = None, model_config: Optional[str] = None, *,
         student_spec: Optional[StudentSpec] = None, latent: str = "mean", batch_size: int = 8, seed: int = 0,
         dtype=jnp.float32) -> Scorer:
    """A Scorer for any teacher or student checkpoint (see `read_checkpoint`)."""
    loaded = read_checkpoint(checkpoint, prompt_embeddings, model_config, student_spec=student_spec,
                             latent=latent)
    if loaded.is_student:
        return student_scorer(loaded.config, loaded.weights, batch_size=batch_size, dtype=dtype)
    return teacher_scorer(loaded.config, loaded.weights, loaded.embeddings, latent=latent,
                          batch_size=batch_size, seed=seed, dtype=dtype)
