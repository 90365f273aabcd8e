"""TFDS builders on fake datasets in their real file layouts: contents, splits, and clear errors."""
import csv

import numpy as np
import pytest
from data_fixtures import make_fake, prepare_fake
from scipy.io import loadmat

from dpiqa_jax.data import DatasetError
from dpiqa_jax.data import synthetic_iqa as synthetic
from dpiqa_jax.data.source import Source, open_source, prepare


def _records(builder) -> dict:
    source = Source(builder)
    return {int(i): source[int(i)] for ids in source.parts.values() for i in ids}


def _check(records: dict, expected: list, image_root) -> None:
    """Every record equals its label row: (index, file name, MOS); the image is the file's bytes."""
    assert sorted(records) == [i for i, _, _ in expected]
    for index, name, mos in expected:
        record = records[index]
        assert record["file_name"].decode() == name and record["index"] == index
        assert record["mos"] == pytest.approx(mos) and record["target"] == pytest.approx(mos / 100)
        assert record["image"] == (image_root / name).read_bytes()


def test_koniq10k(tmp_path):
    builder = prepare_fake("koniq10k", tmp_path, n=12)
    manual = tmp_path / "manual"
    with open(manual / "koniq10k_distributions_sets.csv") as f:
        rows = list(csv.DictReader(f))
    expected = [(i, r["image_name"], float(r["MOS"])) for i, r in enumerate(rows)]
    _check(_records(builder), expected, manual / "1024x768")
    parts = Source(builder).parts
    assert {k: len(v) for k, v in parts.items()} == {"train": 6, "validation": 3, "test": 3}
    assert parts["test"].tolist() == [i for i, r in enumerate(rows) if r["set"] == "test"]


@pytest.mark.parametrize("config,first", [("standard", 7), ("all", 0)])
def test_live_challenge(config, first, tmp_path):
    builder = prepare_fake(f"live_challenge/{config}", tmp_path, n=12)
    data = tmp_path / "manual" / "ChallengeDB_release" / "Data"
    names = [str(c[0][0]) for c in loadmat(data / "AllImages_release.mat")["AllImages_release"]]
    mos = loadmat(data / "AllMOS_release.mat")["AllMOS_release"][0]
    records = _records(builder)
    _check({i: r for i, r in records.items() if i >= 7}, [(i, names[i], mos[i]) for i in range(7, 12)],
           data.parent / "Images")
    assert sorted(records) == list(range(first, 12))
    if first == 0:
        assert records[0]["image"] == (data.parent / "Images" / "trainingImages" / "t1.bmp").read_bytes()


@pytest.mark.parametrize("official", [False, True])
def test_flive(official, tmp_path):
    builder = prepare_fake("flive", tmp_path, n=10, official=official)
    manual = tmp_path / "manual"
    with open(manual / "labels_image.csv") as f:
        rows = list(csv.reader(f))[1:]
    _check(_records(builder), [(i, r[0], float(r[1])) for i, r in enumerate(rows)], manual / "database")
    sizes = {k: len(v) for k, v in Source(builder).parts.items()}
    assert sizes == ({"train": 6, "validation": 2, "test": 2} if official else {"full": 10})


def test_spaq(tmp_path):
    import openpyxl

    builder = prepare_fake("spaq", tmp_path, n=10)
    manual = tmp_path / "manual"
    sheet = openpyxl.load_workbook(manual / "Annotations" / "MOS and Image attribute scores.xlsx").active
    rows = list(sheet.iter_rows(values_only=True))[1:]
    _check(_records(builder), [(i, r[0], r[1]) for i, r in enumerate(rows)], manual / "TestImage")


def test_image_folder(tmp_path):
    builder = prepare_fake("image_folder", tmp_path, n=10)
    manual = tmp_path / "manual"
    with open(manual / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    _check(_records(builder), [(i, r["image"], float(r["mos"])) for i, r in enumerate(rows)], manual)
    assert {k: len(v) for k, v in Source(builder).parts.items()} == {"full": 10}


def test_image_folder_records_are_not_reused_for_another_csv(tmp_path):
    prepare_fake("image_folder", tmp_path, n=10)
    data_dir = str(tmp_path / "tfds")
    assert open_source("image_folder", data_dir, str(tmp_path / "manual")).parts["full"].size == 10
    other = make_fake("image_folder", tmp_path / "other", n=6)
    with pytest.raises(DatasetError, match=r"were built from another scores.csv than .*other/scores.csv"):
        open_source("image_folder", data_dir, str(other))


def test_synthetic_iqa(tmp_path):
    builder = prepare_fake("synthetic_iqa/tiny", tmp_path)
    source = Source(builder)
    assert {k: len(v) for k, v in source.parts.items()} == {"train": 24, "test": 8}
    references = {part: {source[int(i)]["reference"].decode() for i in ids}
                  for part, ids in source.parts.items()}
    assert references["train"] <= set(synthetic.TRAIN_REFERENCES)
    assert references["test"] <= set(synthetic.TEST_REFERENCES)
    assert not set(synthetic.TRAIN_REFERENCES) & set(synthetic.TEST_REFERENCES)
    record = source[3]
    again = synthetic.make_example(3, record["reference"].decode(), builder.builder_config)
    assert again["image"] == record["image"] and again["mos"] == pytest.approx(record["mos"])
    config, kind, strength = builder.builder_config, record["distortion"].decode(), float(record["strength"])
    assert record["target"] == pytest.approx(synthetic.expected_quality(kind, strength, config))
    assert -1.0 <= record["mos"] <= 1.0
    curves = synthetic.quality_curves(config.image_size, config.seed)
    for curve in curves.values():  # smooth labels: non-increasing in strength, from about 1
        assert np.all(np.diff(curve) <= 0) and curve[0] > 0.9 and curve[-1] < 0.8
    clean = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
    assert synthetic.quality(clean, clean) == pytest.approx(1.0)
    assert synthetic.quality(clean, clean * 0.5) < 0.9


def _prepare_error(name, tmp_path, manual) -> str:
    with pytest.raises(DatasetError) as error:
        prepare(name, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name,download", [("koniq10k", "koniq10k_1024x768.zip"), ("spaq", "SPAQ"),
                                           ("live_challenge", "ChallengeDB_release.zip"), ("flive", "FLIVE")])
def test_missing_manual_folder(name, download, tmp_path):
    message = _prepare_error(name, tmp_path, tmp_path / "nowhere")
    assert "manual folder" in message and str(tmp_path / "nowhere") in message and download in message


def test_missing_label_files(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("not the dataset")
    message = _prepare_error("koniq10k", tmp_path, tmp_path / "other")
    assert "koniq10k_distributions_sets.csv" in message and "not found" in message
    make_fake("live_challenge", tmp_path / "clive")
    (tmp_path / "clive" / "ChallengeDB_release" / "Data" / "AllMOS_release.mat").unlink()
    assert "AllMOS_release.mat not found" in _prepare_error("live_challenge", tmp_path, tmp_path / "clive")


def test_listed_images_missing_are_all_named(tmp_path):
    manual = make_fake("koniq10k", tmp_path / "manual")
    for name in ("1003.jpg", "1007.jpg"):
        (manual / "1024x768" / name).unlink()
    message = _prepare_error("koniq10k", tmp_path, manual)
    assert "2 of the 12 images" in message and message.endswith("1003.jpg, 1007.jpg")


def _spoil(folder):
    """Two listed images turned unreadable: 1002.jpg truncated, 1005.jpg an HTML page."""
    data = (folder / "1002.jpg").read_bytes()
    (folder / "1002.jpg").write_bytes(data[:len(data) // 2])
    (folder / "1005.jpg").write_text("<html><body>Not found</body></html>")


def test_unreadable_images_fail_the_build_naming_each(tmp_path):
    manual = make_fake("koniq10k", tmp_path / "manual")
    _spoil(manual / "1024x768")
    message = _prepare_error("koniq10k", tmp_path, manual)
    assert "2 of the 12 images cannot be read" in message and "dataset.skip_bad_images" in message
    assert "1002.jpg: truncated file" in message
    assert "1005.jpg: unknown or unsupported image format" in message


def test_skip_bad_images_leaves_them_out_and_reports_the_count(tmp_path, capsys):
    manual = make_fake("koniq10k", tmp_path / "manual")
    _spoil(manual / "1024x768")
    builder = prepare("koniq10k", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                      skip_bad_images=True)
    assert "left out 2 unreadable images of 12" in capsys.readouterr().out
    names = {r["file_name"].decode() for r in _records(builder).values()}
    assert len(names) == 10 and not names & {"1002.jpg", "1005.jpg"}
    assert sorted(builder.info.metadata["skipped_images"]) == ["1002.jpg", "1005.jpg"]
    # The metadata survives a reload, so a later run can tell what the build left out.
    reopened = open_source("koniq10k", data_dir=str(tmp_path / "tfds"))
    assert sum(len(ids) for ids in reopened.parts.values()) == 10


def _rewrite_koniq_rows(manual, change):
    label_file = manual / "koniq10k_distributions_sets.csv"
    with open(label_file) as f:
        rows = list(csv.DictReader(f))
    change(rows)
    with open(label_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_mos_out_of_range_and_names_listed_twice_are_all_named(tmp_path):
    manual = make_fake("koniq10k", tmp_path / "manual")

    def out_of_range(rows):
        rows[2]["MOS"], rows[5]["MOS"] = "250", "-1"

    _rewrite_koniq_rows(manual, out_of_range)
    message = _prepare_error("koniq10k", tmp_path, manual)
    assert "koniq10k_distributions_sets.csv: 2 MOS values outside koniq10k's range 0-100" in message
    assert message.endswith("1002.jpg (250); 1005.jpg (-1)")

    manual = make_fake("koniq10k", tmp_path / "manual2")

    def twice(rows):
        rows[7]["image_name"] = rows[3]["image_name"]

    _rewrite_koniq_rows(manual, twice)
    message = _prepare_error("koniq10k", tmp_path / "2", manual)
    assert message.endswith("1 image names are listed more than once: 1003.jpg (entries 3, 7)")


def test_missing_column_is_named_with_the_header(tmp_path):
    manual = make_fake("koniq10k", tmp_path / "manual")
    label_file = manual / "koniq10k_distributions_sets.csv"
    label_file.write_text(label_file.read_text().replace('"MOS"', '"mos_mean"', 1))
    message = _prepare_error("koniq10k", tmp_path, manual)
    assert message.startswith(f"{label_file}: no column 'MOS' in its header ['image_name',")


@pytest.mark.parametrize("bad", ["abc", "nan", ""])
def test_label_not_a_number(bad, tmp_path):
    manual = make_fake("flive", tmp_path / "manual", n=4)
    lines = (manual / "labels_image.csv").read_text().splitlines()
    cells = lines[3].split(",")
    lines[3] = ",".join([cells[0], bad] + cells[2:])
    (manual / "labels_image.csv").write_text("\n".join(lines) + "\n")
    message = _prepare_error("flive", tmp_path, manual)
    assert "labels_image.csv line 4" in message
    assert ("is empty" if bad == "" else f"MOS '{bad}' is not a finite number") in message


def test_unknown_dataset_and_split_set(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'konik'"):
        open_source("konik", data_dir=str(tmp_path))
    manual = make_fake("koniq10k", tmp_path / "manual", n=4)
    table = manual / "koniq10k_distributions_sets.csv"
    table.write_text(table.read_text().replace('"validation"', '"val"'))
    assert "set 'val' is not one of" in _prepare_error("koniq10k", tmp_path, manual)


def test_tensorflow_is_kept_off_the_accelerators_before_a_dataset_is_built(tmp_path, monkeypatch):
    """Building runs TensorFlow in the training process: with a full `tensorflow` (Colab) it would
    claim GPU memory that JAX needs, so the accelerators are hidden from it first."""
    import tensorflow as tf

    from dpiqa_jax import tf_runtime
    from dpiqa_jax.data.source import builder

    events = []
    hide = lambda devices, kind: events.append((kind, devices))  # noqa: E731
    monkeypatch.setattr(tf.config, "set_visible_devices", hide)
    monkeypatch.setattr(type(builder("synthetic_iqa/tiny", str(tmp_path))), "download_and_prepare",
                        lambda self, **kwargs: events.append("build"))
    tf_runtime.tensorflow.cache_clear()
    try:
        prepare("synthetic_iqa/tiny", str(tmp_path))
    finally:
        tf_runtime.tensorflow.cache_clear()
    assert events == [("GPU", []), ("TPU", []), "build"]
