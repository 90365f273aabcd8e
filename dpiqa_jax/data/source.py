"""A prepared dataset opened for random access by `index`, whatever TFDS split holds the image."""
from typing import Optional, Union

import numpy as np
import tensorflow_datasets as tfds

from dpiqa_jax import tf_runtime
from dpiqa_jax.data.base import SPLIT_INDICES, ManualIqaBuilder
from dpiqa_jax.data.errors import DatasetError

NAMES = ("koniq10k", "live_challenge", "flive", "spaq", "synthetic_iqa", "image_folder")


Builder = tfds.core.DatasetBuilder


def builder(name: Union[str, Builder], data_dir: Optional[str] = None,
            skip_bad_images: bool = False) -> Builder:
    """The TFDS builder of `name` ('koniq10k', 'live_challenge/all', ...) or `name` itself.
    `skip_bad_images`: building leaves out (and reports) unreadable images instead of failing."""
    if isinstance(name, Builder):
        return name
    import dpiqa_jax.data  # noqa: F401  (registers the builders)

    try:
        return tfds.builder(name, data_dir=data_dir, skip_bad_images=skip_bad_images)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise DatasetError(f"unknown dataset {name!r} (ours: {', '.join(NAMES)}): {reason}") from None


def prepare(name, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
            skip_bad_images: bool = False) -> Builder:
    """Build the dataset's records under `data_dir` unless already there; manual-download datasets
    read their files from `manual_dir` (default `<data_dir>/downloads/manual`)."""
    found = builder(name, data_dir, skip_bad_images)
    if not found.is_prepared():
        tf_runtime.tensorflow()  # building runs TensorFlow: off the accelerators first
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        found.download_and_prepare(download_config=config)
    return found


class Source:
    """Records of every split of a prepared dataset, read by `index` (image bytes undecoded)."""

    def __init__(self, prepared: Builder):
        self.name = prepared.info.full_name
        split_indices = (prepared.info.metadata or {}).get(SPLIT_INDICES)
        if split_indices is None:
            raise DatasetError(f"{self.name} under {prepared.data_dir} has no '{SPLIT_INDICES}' metadata: it "
                               "was not built by dpiqa_jax's builder: delete that folder, prepare it again")
        self.parts = {part: np.asarray(ids, np.int64) for part, ids in split_indices.items()}
        self._records = {part: prepared.as_data_source(part, decoders={"image": tfds.decode.SkipDecoding()})
                         for part in self.parts}
        self._where = {int(i): (part, pos) for part, ids in self.parts.items() for pos, i in enumerate(ids)}

    def __contains__(self, index: int) -> bool:
        return int(index) in self._where

    def __getitem__(self, index: int) -> dict:
        part, position = self._where[int(index)]
        record = self._records[part][position]
        if int(record["index"]) != int(index):
            raise DatasetError(f"{self.name}: record {position} of split {part!r} holds index "
                               f"{record['index']}, not {index}: the prepared files do not match their "
                               "metadata; rebuild them")
        return record


def open_source(name, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                process_count: int = 1, skip_bad_images: bool = False) -> Source:
    """The dataset ready to read; built first if needed, by a single process only (several
    processes would write the same files at once)."""
    found = builder(name, data_dir, skip_bad_images)
    if found.is_prepared() and manual_dir and isinstance(found, ManualIqaBuilder):
        stale = found.stale_reason(manual_dir)
        if stale:
            raise DatasetError(f"{found.info.full_name}: {stale}")
    if not found.is_prepared():
        if process_count > 1:
            raise DatasetError(f"{found.info.full_name} is not prepared under {found.data_dir}: prepare it "
                               "once (dpiqa_jax.data.source.prepare) before a multi-process run")
        found = prepare(found, manual_dir=manual_dir)
    return Source(found)
