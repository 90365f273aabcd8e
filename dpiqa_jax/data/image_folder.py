"""image_folder: your own images and scores, for fine-tuning or evaluating on them.

The folder holds `scores.csv` (columns `image`: the file's path relative to the CSV, and `mos`:
its score on 0-100, higher is better; rescale other scales first) and the images. There is no
official split: use `random[:SEED[:FRACTION]]` or index files.

Each folder is its own dataset, so its prepared records must not be reused for another folder or
for an edited `scores.csv`: the build records the CSV's SHA-256, and opening the records with a
folder whose CSV differs is an error that says what to do.
"""
import hashlib
from pathlib import Path
from typing import Optional

from dpiqa_jax.data.base import ManualIqaBuilder, Row, cell, column, finite, read_csv

LABEL_SHA256 = "label_sha256"


class ImageFolder(ManualIqaBuilder):
    """A folder of images with `scores.csv` (module docstring)."""

    DESCRIPTION = __doc__
    LABEL_FILE = "scores.csv"
    DOWNLOAD = (f"write {LABEL_FILE} (columns image, mos; mos on 0-100) in the folder of your images, "
                "with image paths relative to it")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {LABEL_FILE} (columns image, mos) beside your images."

    def _read_rows(self, label_file: Path) -> list[Row]:
        self.info.metadata[LABEL_SHA256] = _sha256(label_file)
        header, lines = read_csv(label_file)
        name, mos = (column(header, c, label_file) for c in ("image", "mos"))
        rows = []
        for index, (line, cells) in enumerate(lines):
            where = f"{label_file} line {line}"
            rows.append(Row(index, cell(cells, name, where), finite(cell(cells, mos, where), where)))
        return rows

    def stale_reason(self, manual_dir: str) -> Optional[str]:
        label_file = self._label_file(Path(manual_dir))
        if _sha256(label_file) == self.info.metadata.get(LABEL_SHA256):
            return None
        return (f"the records in {self.data_dir} were built from another {self.LABEL_FILE} than {label_file} "
                "(another folder, or the file changed): give this folder its own dataset.data_dir, or "
                "delete that folder to rebuild")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
