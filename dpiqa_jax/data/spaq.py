"""SPAQ: 11,125 smartphone photos (up to 4000x3000), MOS 0-100, labels in an .xlsx sheet."""
from pathlib import Path

from dpiqa_jax.data.base import ManualIqaBuilder, Row, cell, finite
from dpiqa_jax.data.errors import DatasetError


class Spaq(ManualIqaBuilder):
    """SPAQ. Names and MOS are the first two columns of the sheet (its first row is the header),
    as the authors read it with `pd.read_excel(header=None, skiprows=1)`."""

    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/h4nwei/SPAQ"
    LABEL_FILE = "MOS and Image attribute scores.xlsx"
    IMAGE_DIRS = ("TestImage", "SPAQ/TestImage", "../TestImage", "../SPAQ/TestImage", ".")
    DOWNLOAD = f"download the SPAQ database (TestImage/ and Annotations/) as {HOMEPAGE} explains"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download SPAQ as {HOMEPAGE} explains and unzip it in the manual folder (on Linux, repair the
    archive first: `zip -FF SPAQ.zip --out SPAQ_fixed.zip`):
      <manual_dir>/TestImage/00001.jpg ...
      <manual_dir>/Annotations/{LABEL_FILE}
    """

    def _read_rows(self, label_file: Path) -> list[Row]:
        import openpyxl  # only SPAQ needs it

        try:
            book = openpyxl.load_workbook(label_file, read_only=True, data_only=True)
        except Exception as e:  # openpyxl raises zipfile, KeyError or its own errors
            raise DatasetError(f"{label_file}: not a readable .xlsx file ({type(e).__name__}: {e})") from None
        try:
            lines = list(book.worksheets[0].iter_rows(values_only=True))
        finally:
            book.close()
        while lines and all(v in (None, "") for v in lines[-1]):
            lines.pop()  # pandas drops trailing empty rows
        rows = []
        for index, cells in enumerate(lines[1:]):
            where = f"{label_file} row {index + 2}"
            name = cell(cells, 0, where)
            rows.append(Row(index, str(name).strip(), finite(cell(cells, 1, where), where)))
        return rows
