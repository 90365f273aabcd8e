"""Datasets and input pipeline. Importing this package registers the TFDS builders `koniq10k`,
`live_challenge` (configs `standard`, `all`), `flive`, `spaq`, `synthetic_iqa` (configs
`default`, `tiny`, or any SyntheticConfig) and `image_folder` (your own images and scores.csv)."""
from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.data.flive import Flive
from dpiqa_jax.data.image_folder import ImageFolder
from dpiqa_jax.data.images import ImageError, load_image
from dpiqa_jax.data.koniq10k import Koniq10k
from dpiqa_jax.data.live_challenge import LiveChallenge
from dpiqa_jax.data.pipeline import eval_batches, to_global, train_batches
from dpiqa_jax.data.source import prepare
from dpiqa_jax.data.spaq import Spaq
from dpiqa_jax.data.splits import SplitSpec, parse_split
from dpiqa_jax.data.synthetic_iqa import SyntheticConfig, SyntheticIqa

__all__ = ["DatasetError", "Flive", "ImageError", "ImageFolder", "Koniq10k", "LiveChallenge", "Spaq",
           "SplitSpec", "SyntheticConfig", "SyntheticIqa", "eval_batches", "load_image", "parse_split",
           "prepare", "to_global", "train_batches"]
