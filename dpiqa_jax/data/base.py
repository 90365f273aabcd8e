"""What the IQA builders share: features, label rows, the manual folder, and example generation.

Every builder writes ArrayRecord files (random access: the pipeline reads any image by position)
without shuffling and keyed by `index`, so each TFDS split holds its images in `index` order, and
records the indices of every split in the dataset's metadata (`split_indices`). `index` is the row
in which the authors enumerate the dataset, so their saved index files select the same images.
"""
import csv
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.data.images import ImageError, load_image

SPLIT_INDICES = "split_indices"
SKIPPED = "skipped_images"  # metadata: {file name: reason} of the images a build left out
NAMED_AT_MOST = 20  # bad files named in one message
FULL = "full"  # the one TFDS split of a dataset without an official split


@dataclasses.dataclass(frozen=True)
class Row:
    """One labelled image: `index` is its row in the authors' enumeration, `part` its official split."""
    index: int
    name: str
    mos: float
    part: str = FULL


def iqa_features(**extra) -> tfds.features.FeaturesDict:
    """image (the file's own bytes, any format), mos (native scale), target (SPEC's normalised
    score), file_name and index, plus any dataset-specific `extra` features."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "mos": np.float32,
        "target": np.float32,
        "file_name": tfds.features.Text(),
        "index": np.int32,
        **extra,
    })


def finite(value, where: str) -> float:
    """`value` as a finite float, else a DatasetError naming `where` (file and row)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise DatasetError(f"{where}: MOS {value!r} is not a finite number")
    return number


def split_indices(rows: Sequence[Row]) -> dict[str, list[int]]:
    parts: dict[str, list[int]] = {}
    for row in rows:
        parts.setdefault(row.part, []).append(row.index)
    return {part: sorted(indices) for part, indices in parts.items()}


class IqaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every IQA builder: ArrayRecord, unshuffled, with the per-split index metadata."""

    VERSION = tfds.core.Version("1.0.0")
    DESCRIPTION = ""
    HOMEPAGE = ""

    def __init__(self, *, file_format: str = "array_record", skip_bad_images: bool = False, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        self.skip_bad_images = skip_bad_images

    def _features(self) -> tfds.features.FeaturesDict:
        return iqa_features()

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=self._features(),
                                     homepage=self.HOMEPAGE, disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict())

    def _splits_from_rows(self, rows: Sequence[Row], images: Sequence) -> dict[str, Iterator]:
        """One TFDS split per official part; records the indices of each in the metadata."""
        self.info.metadata[SPLIT_INDICES] = split_indices(rows)
        by_part: dict[str, list[tuple[Row, object]]] = {}
        for row, image in zip(rows, images, strict=True):
            by_part.setdefault(row.part, []).append((row, image))
        return {part: self._generate_examples(pairs) for part, pairs in by_part.items()}

    def _generate_examples(self, pairs: Iterable[tuple[Row, object]]):
        for row, image in pairs:
            yield row.index, {"image": image, "mos": row.mos, "target": row.mos / 100.0,
                              "file_name": row.name, "index": row.index}


class ManualIqaBuilder(IqaBuilder, skip_registration=True):
    """A dataset that the user downloads: its label file is searched for under the manual folder
    (directly or in any subfolder), and its images in IMAGE_DIRS relative to the label file."""

    LABEL_FILE = ""
    IMAGE_DIRS: tuple[str, ...] = (".",)
    DOWNLOAD = ""  # one line: what to download and from where
    MOS_RANGE = (0.0, 100.0)  # every dataset of SPEC.md scores on 0-100

    @classmethod
    def instructions(cls) -> str:
        return (f"{cls.DOWNLOAD}, and unpack it in the manual folder (`{cls.LABEL_FILE}` may be in a "
                "subfolder)")

    def _read_rows(self, label_file: Path) -> list[Row]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        label_file = self._label_file(self._manual_root(dl_manager))
        rows = self._read_rows(label_file)
        if not rows:
            raise DatasetError(f"{self.name}: {label_file} lists no images")
        self._check_rows(rows, label_file)
        rows, paths = self._readable(rows, self._image_paths(rows, label_file))
        return self._splits_from_rows(rows, paths)

    def _readable(self, rows: list[Row], paths: list[str]) -> tuple[list[Row], list[str]]:
        """The rows and paths whose image decodes; the others fail the build, or with
        `skip_bad_images` are left out, counted and recorded in the metadata."""
        bad = unreadable(paths)
        if not bad:
            return rows, paths
        if not self.skip_bad_images:
            raise DatasetError(f"{self.name}: {len(bad)} of the {len(rows)} images cannot be read (the "
                               f"dataset.skip_bad_images switch leaves them out): {_name_some(bad.values())}")
        print(f"{self.name}: left out {len(bad)} unreadable images of {len(rows)}: "
              f"{_name_some(bad.values())}")
        self.info.metadata[SKIPPED] = {rows[i].name: reason for i, reason in bad.items()}
        keep = [i for i in range(len(rows)) if i not in bad]
        return [rows[i] for i in keep], [paths[i] for i in keep]

    def stale_reason(self, manual_dir: str) -> Optional[str]:
        """Why the prepared records do not hold what `manual_dir` has now (None: they do, or
        cannot be told cheaply). Datasets whose files never change need no check."""
        return None

    def _check_rows(self, rows: Sequence[Row], label_file: Path) -> None:
        """MOS values out of range and names listed twice: each kind in one error naming them all."""
        low, high = self.MOS_RANGE
        outside = [f"{row.name} ({row.mos:g})" for row in rows if not low <= row.mos <= high]
        if outside:
            raise DatasetError(f"{label_file}: {len(outside)} MOS values outside {self.name}'s range "
                               f"{low:g}-{high:g}: {_name_some(outside)}")
        entries: dict[str, list[int]] = {}
        for row in rows:
            entries.setdefault(row.name, []).append(row.index)
        twice = [f"{name} (entries {', '.join(map(str, at))})" for name, at in entries.items() if len(at) > 1]
        if twice:
            raise DatasetError(f"{label_file}: {len(twice)} image names are listed more than once: "
                               f"{_name_some(twice)}")

    def _manual_root(self, dl_manager) -> Path:
        try:
            return Path(dl_manager.manual_dir)
        except AssertionError:  # tfds's multi-line message; ours names the folder and the files
            folder = getattr(dl_manager, "_manual_dir", "the manual folder")
            raise DatasetError(f"{self.name}: manual folder {folder} is missing or empty: "
                               f"{self.instructions()}") from None

    def _label_file(self, root: Path) -> Path:
        found = sorted(root.rglob(self.LABEL_FILE), key=lambda p: (len(p.parts), str(p)))
        if not found:
            raise DatasetError(f"{self.name}: label file {self.LABEL_FILE!r} not found under {root}: "
                               f"{self.instructions()}")
        return found[0]

    def _image_paths(self, rows: Sequence[Row], label_file: Path) -> list[str]:
        """The path of every listed image; one DatasetError listing all the absent ones."""
        folders = [os.path.normpath(label_file.parent / d) for d in self.IMAGE_DIRS]
        paths, missing = [], []
        for row in rows:
            path = next((p for p in (os.path.join(f, row.name) for f in folders) if os.path.isfile(p)), None)
            if path is None:
                missing.append(row.name)
            paths.append(path)
        if missing:
            raise DatasetError(f"{self.name}: {len(missing)} of the {len(rows)} images listed in "
                               f"{label_file} are not in {' or '.join(folders)}: {', '.join(missing)}")
        return paths


def unreadable(paths: Sequence[str]) -> dict[int, str]:
    """{position: 'FILE: reason'} of the images that fail a full decode (as training reads them:
    same pixel cap, same decoder), checked on threads (PIL decodes without the GIL)."""
    def check(path):
        try:
            load_image(path, size=8)
        except ImageError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        reasons = list(pool.map(check, paths))
    return {i: reason for i, reason in enumerate(reasons) if reason is not None}


def _name_some(reasons) -> str:
    reasons = list(reasons)
    more = f"; and {len(reasons) - NAMED_AT_MOST} more" if len(reasons) > NAMED_AT_MOST else ""
    return "; ".join(reasons[:NAMED_AT_MOST]) + more


def read_csv(label_file: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV file, skipping blank lines as pandas does."""
    with open(label_file, newline="", encoding="utf-8-sig") as f:
        lines = [(n, cells) for n, cells in enumerate(csv.reader(f), start=1)
                 if any(c.strip() for c in cells)]
    if not lines:
        raise DatasetError(f"{label_file}: empty label file")
    return lines[0][1], lines[1:]


def column(header: Sequence[str], wanted: str, label_file: Path) -> int:
    """Position of column `wanted` in a CSV header, else a DatasetError naming the file."""
    try:
        return list(header).index(wanted)
    except ValueError:
        raise DatasetError(f"{label_file}: no column {wanted!r} in its header {list(header)}") from None


def cell(cells: Sequence, col: int, where: str):
    if col >= len(cells) or cells[col] in (None, ""):
        raise DatasetError(f"{where}: column {col + 1} is empty")
    return cells[col]
