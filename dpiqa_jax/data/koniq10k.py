"""KonIQ-10k: 10,073 photos (1024x768), MOS 0-100, official split in the `set` column."""
from pathlib import Path

from dpiqa_jax.data.base import ManualIqaBuilder, Row, cell, column, finite, read_csv
from dpiqa_jax.data.errors import DatasetError

_PARTS = {"training": "train", "validation": "validation", "test": "test"}


class Koniq10k(ManualIqaBuilder):
    """KonIQ-10k, one TFDS split per official part: train 7,058 / validation 1,000 / test 2,015."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://database.mmsp-kn.de/koniq-10k-database.html"
    LABEL_FILE = "koniq10k_distributions_sets.csv"
    IMAGE_DIRS = ("1024x768", ".")
    DOWNLOAD = (f"download koniq10k_1024x768.zip and {LABEL_FILE} from {HOMEPAGE} (the authors use the "
                "1024x768 images)")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download `koniq10k_1024x768.zip` and `{LABEL_FILE}` from {HOMEPAGE}.
    Put both in the manual folder and unzip the images there:
      <manual_dir>/{LABEL_FILE}
      <manual_dir>/1024x768/<image_name>.jpg
    """

    def _read_rows(self, label_file: Path) -> list[Row]:
        header, lines = read_csv(label_file)
        name, mos, part = (column(header, c, label_file) for c in ("image_name", "MOS", "set"))
        rows = []
        for index, (line, cells) in enumerate(lines):
            where = f"{label_file} line {line}"
            official = _PARTS.get(cell(cells, part, where))
            if official is None:
                raise DatasetError(f"{where}: set {cells[part]!r} is not one of {sorted(_PARTS)}")
            score = finite(cell(cells, mos, where), where)
            rows.append(Row(index, cell(cells, name, where), score, official))
        return rows
