"""synthetic_iqa: a built-in IQA dataset that needs no download (the default of the demo training).

Reference photos are the natural images that scikit-image ships in its wheel (read offline).
Each example is a crop of one photo (log-uniform from 2x `image_size` to the whole photo, turned
or flipped at random), resized to `image_size` and stretched to full levels 0-1 (so that every
reference is well exposed and a darkened, brightened or flattened image can be told as such from
the image alone), then degraded by one of six distortions at a continuous strength s ~ U(0, 1).
Labels come from SSIM (Wang et al. 2004: Gaussian window, sigma 1.5, over the RGB channels,
scikit-image) between the stored distorted image and its clean crop:
- `mos`: the SSIM of this very image;
- `target` (what models learn): the expected SSIM of its distortion at its strength, the mean
  over calibration crops of the train photos on a grid of strengths, interpolated. It is a smooth,
  non-increasing function of strength alone, so a model must judge the distortion, not recognise
  a photo's content (with only 12 train photos, per-image SSIM lets a small model fit content).
  It ranks the per-image SSIM with a Spearman correlation of about 0.95.
Each distortion's parameter is shaped so that SSIM falls roughly linearly from 1 to 0.1-0.5 as s
goes from 0 to 1. Train and test use disjoint photos (12 and 5).
"""
import dataclasses
import functools
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from dpiqa_jax.data.base import SPLIT_INDICES, IqaBuilder, iqa_features

TRAIN_REFERENCES = ("astronaut", "coffee", "camera", "moon", "grass", "brick", "cell", "page",
                    "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle")
TEST_REFERENCES = ("chelsea", "rocket", "coins", "gravel", "text")
DISTORTIONS = ("blur", "noise", "jpeg", "contrast", "brighten", "darken")
MIN_ZOOM = 2  # crops are at least 2x image_size (when the photo allows): downscaling hides its own flaws
MIN_SPAN = 0.25  # a reference crop's 1-99% levels must span this much (no flat sky or black space)
CALIBRATION_CROPS = 16
STRENGTHS = np.linspace(0.0, 1.0, 11)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    num_train: int = 4000
    num_test: int = 1000
    image_size: int = 64  # the labels are computed at this size: train at it for the cleanest task
    seed: int = 0


@functools.lru_cache(maxsize=None)
def reference_photo(name: str) -> np.ndarray:
    """scikit-image's bundled photo `name` as uint8 RGB (grey photos repeated on 3 channels)."""
    from skimage import data

    photo = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    photo = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
    return np.ascontiguousarray(photo, dtype=np.uint8)


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop from MIN_ZOOM x size pixels to the whole shorter side (log-uniform, so small
    details and whole scenes are both common), turned and flipped at random, resized to size."""
    height, width = photo.shape[:2]
    short = min(height, width)
    side = int(round(np.exp(rng.uniform(np.log(min(short, MIN_ZOOM * size)), np.log(short)))))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    crop = crop.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    turn = int(rng.integers(1 + len(Image.Transpose)))  # identity, flips, rotations, transpositions
    crop = crop.transpose(Image.Transpose(turn - 1)) if turn else crop
    return _float(crop)


def clean_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop with some detail (its 1-99% levels span >= MIN_SPAN; else another crop),
    stretched to levels 0-1: all references are well exposed, so a darkened, brightened or
    flattened image can be told from the image alone, as a viewer would."""
    for _ in range(20):
        crop = random_crop(photo, size, rng)
        low, high = np.percentile(crop, [1, 99])
        if high - low >= MIN_SPAN:
            break
    return np.clip((crop - low) / (high - low), 0.0, 1.0).astype(np.float32)


def distort(image: np.ndarray, kind: str, s: float, rng: np.random.Generator) -> np.ndarray:
    """`image` (float32 in [0, 1]) degraded by distortion `kind` at strength s in [0, 1]."""
    size = image.shape[0]
    if kind == "blur":
        sigma = (0.4 + 3.6 * s**1.5) * size / 64
        return ndimage.gaussian_filter(image, (sigma, sigma, 0))
    if kind == "noise":
        return np.clip(image + rng.normal(0.0, 0.15 * s**1.5, image.shape).astype(np.float32), 0, 1)
    if kind == "jpeg":
        buffer = io.BytesIO()
        _uint8(image).save(buffer, "JPEG", quality=int(round(2 + 88 * (1 - s) ** 2)))
        return _float(Image.open(buffer))
    if kind == "contrast":
        mean = image.mean()
        return mean + (1 - 0.95 * s**0.8) * (image - mean)
    if kind == "brighten":
        return np.clip(image * (1 + 3 * s**1.3), 0, 1)
    if kind == "darken":
        return image * (1 - 0.9 * s**0.7)
    raise ValueError(f"unknown distortion {kind!r}; known: {DISTORTIONS}")


def quality(clean: np.ndarray, distorted: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(clean, distorted, data_range=1.0, channel_axis=-1,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def _distorted(clean: np.ndarray, kind: str, s: float, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """The distorted image as stored (8 bits) and its SSIM to `clean`."""
    stored = _uint8(distort(clean, kind, s, rng))
    return stored, quality(clean, _float(stored))


@functools.lru_cache(maxsize=None)
def quality_curves(image_size: int, seed: int) -> dict[str, np.ndarray]:
    """Per distortion, the mean SSIM over CALIBRATION_CROPS clean crops of the train photos at each
    of STRENGTHS, made non-increasing."""
    rng = np.random.default_rng([seed, 1 << 40])  # a stream no example index uses
    crops = [clean_crop(reference_photo(TRAIN_REFERENCES[i % len(TRAIN_REFERENCES)]), image_size, rng)
             for i in range(CALIBRATION_CROPS)]
    curves = {}
    for kind in DISTORTIONS:
        means = [np.mean([_distorted(c, kind, s, rng)[1] for c in crops]) for s in STRENGTHS]
        curves[kind] = np.minimum.accumulate(means)
    return curves


def expected_quality(kind: str, s: float, config: SyntheticConfig) -> float:
    return float(np.interp(s, STRENGTHS, quality_curves(config.image_size, config.seed)[kind]))


def make_example(index: int, reference: str, config: SyntheticConfig) -> dict:
    """Example `index` (a function of the seed and index alone, so any subset rebuilds the same)."""
    rng = np.random.default_rng([config.seed, index])
    clean = clean_crop(reference_photo(reference), config.image_size, rng)
    kind, s = DISTORTIONS[rng.integers(len(DISTORTIONS))], float(rng.uniform())
    stored, score = _distorted(clean, kind, s, rng)
    png = io.BytesIO()
    stored.save(png, "PNG", compress_level=1)
    return {"image": png.getvalue(), "mos": score, "target": expected_quality(kind, s, config),
            "index": index, "file_name": f"{reference}-{kind}-{index:06d}.png", "reference": reference,
            "distortion": kind, "strength": s}


class SyntheticIqa(IqaBuilder):
    """Synthetic distortions of scikit-image's photos, labelled by SSIM (module docstring).
    Splits `train` and `test` (disjoint photos); `index` runs over train, then test."""

    DESCRIPTION = __doc__
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="4,000 train / 1,000 test images of 64 px"),
        SyntheticConfig(name="tiny", num_train=24, num_test=8, image_size=32, description="for tests"),
    ]

    def _features(self) -> tfds.features.FeaturesDict:
        return iqa_features(reference=tfds.features.Text(), distortion=tfds.features.Text(),
                            strength=np.float32)

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        parts = {"train": (range(cfg.num_train), TRAIN_REFERENCES),
                 "test": (range(cfg.num_train, cfg.num_train + cfg.num_test), TEST_REFERENCES)}
        self.info.metadata[SPLIT_INDICES] = {name: list(ids) for name, (ids, _) in parts.items()}
        return {name: self._generate_examples(ids, refs) for name, (ids, refs) in parts.items()}

    def _generate_examples(self, ids: range, references: tuple[str, ...]):
        for n, index in enumerate(ids):
            yield index, make_example(index, references[n % len(references)], self.builder_config)


def _uint8(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))


def _float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
