"""Datasets and input pipeline. Importing this package registers the TFDS builders `koniq10k`,
`live_challenge` (configs `standard`, `all`), `flive`, `spaq` and `synthetic_iqa`."""
from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.data.flive import Flive
from dpiqa_jax.data.images import ImageError, load_image
from dpiqa_jax.data.koniq10k import Koniq10k
from dpiqa_jax.data.live_challenge import LiveChallenge
from dpiqa_jax.data.spaq import Spaq
from dpiqa_jax.data.synthetic_iqa import SyntheticConfig, SyntheticIqa

__all__ = ["DatasetError", "Flive", "ImageError", "Koniq10k", "LiveChallenge", "Spaq", "SyntheticConfig",
           "SyntheticIqa", "load_image"]
