"""Fake IQA datasets in the real file layouts (label files as distributed, a few small images), for
the data tests and for any test that trains on a real builder:

    manual_dir = make_fake("koniq10k", tmp_path / "manual", n=12)
    builder = prepare_fake("koniq10k", tmp_path, n=12)    # files written and TFDS records built

Images are small smooth colour fields with noise (so JPEG behaves as on photos), 40x30 by default;
their MOS are spread over 0-100 so that a split has both good and bad images.
"""
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 40, height: int = 30, seed: int = 0) -> np.ndarray:
    """A uint8 RGB array that looks enough like a photo for codecs: gradients plus grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], axis=-1)
    image = 127.5 * (1 + base) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def write_image(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".bmp": "BMP", ".png": "PNG"}.get(path.suffix.lower(), "JPEG")
    path.write_bytes(encode(photo(*size, seed=seed), fmt))


def scores(n: int) -> list[float]:
    return [round(5 + 90 * ((7 * i) % n) / max(n - 1, 1), 3) for i in range(n)]


def make_koniq10k(root: Path, n: int = 12) -> Path:
    """koniq10k_distributions_sets.csv + 1024x768/; sets cycle training, training, validation, test."""
    sets = ["training", "training", "validation", "test"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "koniq10k_distributions_sets.csv", "w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC)
        out.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"])
        for i, mos in enumerate(scores(n)):
            out.writerow([f"{1000 + i}.jpg", 1, 2, 3, 2, 1, 9, mos, 10.5, sets[i % 4]])
            write_image(root / "1024x768" / f"{1000 + i}.jpg", seed=i)
    return root


def make_live_challenge(root: Path, n: int = 12) -> Path:
    """ChallengeDB_release/Data/{AllImages,AllMOS}_release.mat (MATLAB cell array and row vector)
    and Images/ with the first 7 (t1.bmp ... t7.bmp) in Images/trainingImages/, like the release."""
    from scipy.io import savemat

    assert n > 7, "the first 7 images are the training images"
    base = root / "ChallengeDB_release"
    names = [f"t{i + 1}.bmp" for i in range(7)]
    names += [f"{i}.JPG" if i % 2 else f"{i}.bmp" for i in range(8, n + 1)]
    cells = np.empty((n, 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = np.array([name])
        folder = base / "Images" / ("trainingImages" if i < 7 else "")
        write_image(folder / name, seed=i, size=(32, 32))
    (base / "Data").mkdir(parents=True, exist_ok=True)
    savemat(base / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    savemat(base / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([scores(n)], dtype=np.float64)})
    return root


def make_flive(root: Path, n: int = 10, official: bool = False) -> Path:
    """labels_image.csv (name, mos, ...) with names relative to database/; with `official`, the
    PaQ-2-PiQ `labels<=640_padded.csv` (is_valid) listing all but the last 2 images."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"voc_emotic_ava/AVA__{i}.jpg" if i % 2 else f"blur_dataset/{i}.jpg" for i in range(n)]
    with open(root / "labels_image.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["name", "mos", "height", "width"])
        for i, (name, mos) in enumerate(zip(names, scores(n), strict=True)):
            out.writerow([name, mos, 30, 40])
            write_image(root / "database" / name, seed=i)
    if official:
        with open(root / "labels<=640_padded.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["name_image", "mos_image", "is_valid"])
            for i, name in enumerate(names[:-2]):
                out.writerow([name, 50, "True" if i % 4 == 3 else "False"])
    return root


def make_spaq(root: Path, n: int = 10) -> Path:
    """Annotations/MOS and Image attribute scores.xlsx (header row, then name, MOS, attributes)
    and TestImage/*.jpg, as the SPAQ archive unpacks."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    for i, mos in enumerate(scores(n)):
        sheet.append([f"{i + 1:05d}.jpg", mos, 50, 50, 50, 50, 50])
        write_image(root / "TestImage" / f"{i + 1:05d}.jpg", seed=i, size=(48, 64))
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    book.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    return root


def make_image_folder(root: Path, n: int = 10) -> Path:
    """scores.csv (image, mos) with images in the folder and in a subfolder, as a user writes it."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"shots/{i}.png" if i % 3 == 0 else f"{i}.jpg" for i in range(n)]
    with open(root / "scores.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "mos"])
        for i, (name, mos) in enumerate(zip(names, scores(n), strict=True)):
            out.writerow([name, mos])
            write_image(root / name, seed=i)
    return root


MAKERS = {"koniq10k": make_koniq10k, "live_challenge": make_live_challenge, "flive": make_flive,
          "spaq": make_spaq, "image_folder": make_image_folder}


def make_fake(name: str, root: Path, n: int = 12, **kwargs) -> Path:
    """Write the fake files of dataset `name` (a config suffix is ignored) under `root`."""
    return MAKERS[name.split("/")[0]](Path(root), n, **kwargs)


def prepare_fake(name: str, tmp_path: Path, n: int = 12, **kwargs):
    """Fake files of `name` under tmp_path/manual, TFDS records under tmp_path/tfds; the builder.
    For `synthetic_iqa[/config]` nothing is faked: the (small) real dataset is built."""
    from dpiqa_jax.data.source import prepare

    manual = None
    if not name.startswith("synthetic_iqa"):
        manual = str(make_fake(name, Path(tmp_path) / "manual", n, **kwargs))
    return prepare(name, data_dir=str(Path(tmp_path) / "tfds"), manual_dir=manual)
