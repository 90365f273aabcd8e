"""FLIVE (LIVE-FB, PaQ-2-PiQ): about 39,800 pictures, MOS 0-100 in `labels_image.csv`."""
from pathlib import Path

from dpiqa_jax.data.base import FULL, ManualIqaBuilder, Row, cell, column, finite, read_csv
from dpiqa_jax.data.errors import DatasetError

OFFICIAL_FILE = "labels<=640_padded.csv"


class Flive(ManualIqaBuilder):
    """FLIVE. Names and MOS are the first two columns of `labels_image.csv`, as the authors read it.

    Official split: when `labels<=640_padded.csv` of the PaQ-2-PiQ release sits beside the label
    file, its `is_valid` column gives train (False) and validation (True) among the pictures of at
    most 640 px, and the rest (the larger pictures of `labels>640.csv`) is the test part. Without
    that file the dataset has one split, `full`."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/niu-haoran/FLIVE_Database"
    LABEL_FILE = "labels_image.csv"
    IMAGE_DIRS = (".", "database")
    DOWNLOAD = f"download the FLIVE database (images and {LABEL_FILE}) as {HOMEPAGE} explains"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download the FLIVE database as {HOMEPAGE} explains. Lay it out so that the names of the
    first column of `{LABEL_FILE}` are paths relative to the folder that holds it (or to its
    `database/` subfolder):
      <manual_dir>/{LABEL_FILE}
      <manual_dir>/<name from {LABEL_FILE}>
    Optionally put `{OFFICIAL_FILE}` (PaQ-2-PiQ) beside it for the official split.
    """

    def _read_rows(self, label_file: Path) -> list[Row]:
        _, lines = read_csv(label_file)
        parts = _official_parts(label_file.parent / OFFICIAL_FILE)
        rows = []
        for index, (line, cells) in enumerate(lines):
            where = f"{label_file} line {line}"
            name = cell(cells, 0, where)
            part = parts.get(name, parts.get(name.rsplit("/", 1)[-1], "test")) if parts else FULL
            rows.append(Row(index, name, finite(cell(cells, 1, where), where), part))
        return rows


def _official_parts(path: Path) -> dict[str, str]:
    """Picture name (and its base name) -> 'train' or 'validation'; empty without the file."""
    if not path.is_file():
        return {}
    header, lines = read_csv(path)
    name, valid = column(header, "name_image", path), column(header, "is_valid", path)
    parts = {}
    for line, cells in lines:
        flag = cell(cells, valid, f"{path} line {line}").strip().lower()
        if flag not in ("true", "false"):
            raise DatasetError(f"{path} line {line}: is_valid {cells[valid]!r} is not True or False")
        image = cell(cells, name, f"{path} line {line}")
        parts[image] = parts[image.rsplit("/", 1)[-1]] = "validation" if flag == "true" else "train"
    return parts
