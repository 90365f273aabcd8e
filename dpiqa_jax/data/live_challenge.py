"""LIVE In the Wild Image Quality Challenge (CLIVE): 1,169 pictures (500x500), MOS 0-100."""
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dpiqa_jax.data.base import ManualIqaBuilder, Row, finite
from dpiqa_jax.data.errors import DatasetError

TRAINING_IMAGES = 7  # the first 7 entries of AllImages_release, in Images/trainingImages/
MOS_FILE, MOS_KEY, NAMES_KEY = "AllMOS_release.mat", "AllMOS_release", "AllImages_release"


class LiveChallenge(ManualIqaBuilder):
    """CLIVE, in one split `full`. `index` is the position in `AllImages_release.mat` (0-1168), as
    the authors enumerate it. Config `standard` (default) drops the 7 training images (1,162
    pictures, as papers commonly do); `all` keeps them (1,169, as the authors' code does)."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://live.ece.utexas.edu/research/ChallengeDB/index.html"
    LABEL_FILE = "AllImages_release.mat"
    IMAGE_DIRS = ("../Images", "../Images/trainingImages")
    DOWNLOAD = f"download ChallengeDB_release.zip from {HOMEPAGE}"
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="standard", description="1,162 pictures: the 7 training images dropped"),
        tfds.core.BuilderConfig(name="all", description="all 1,169 pictures"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download `ChallengeDB_release.zip` from {HOMEPAGE} and unzip it in the manual folder:
      <manual_dir>/ChallengeDB_release/Data/{LABEL_FILE}
      <manual_dir>/ChallengeDB_release/Data/{MOS_FILE}
      <manual_dir>/ChallengeDB_release/Images/*.bmp|*.JPG (trainingImages/ inside)
    """

    def _read_rows(self, label_file: Path) -> list[Row]:
        names = [str(np.asarray(c).ravel()[0]) for c in _mat(label_file, NAMES_KEY).ravel()]
        mos_file = label_file.parent / MOS_FILE
        if not mos_file.is_file():
            raise DatasetError(f"{self.name}: label file {mos_file} not found: {self.instructions()}")
        scores = _mat(mos_file, MOS_KEY).ravel()
        if len(scores) != len(names):
            raise DatasetError(f"{mos_file}: {len(scores)} scores for the {len(names)} images of "
                               f"{label_file}")
        first = TRAINING_IMAGES if self.builder_config.name == "standard" else 0
        return [Row(i, names[i], finite(scores[i], f"{mos_file} entry {i + 1} ({names[i]})"))
                for i in range(first, len(names))]


def _mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError or its own MatReadError
        raise DatasetError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from None
    if key not in content:
        raise DatasetError(f"{path}: no variable {key!r} (found {sorted(k for k in content if k[0] != '_')})")
    return content[key]
