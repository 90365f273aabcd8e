"""Split specs: official, seeded random (10-split protocol), index files; train and test disjoint."""
import json

import numpy as np
import pytest

from dpiqa_jax.data import DatasetError
from dpiqa_jax.data.splits import SplitSpec, hash_order, parse_split, read_indices, resolve

KONIQ_LIKE = {"train": np.arange(0, 70), "validation": np.arange(70, 80), "test": np.arange(80, 100)}
SINGLE = {"full": np.arange(7, 107)}  # e.g. CLIVE without its first 7 images


def _disjoint_cover(result, everything):
    assert not np.intersect1d(result["train"], result["test"]).size
    assert np.array_equal(np.union1d(result["train"], result["test"]), everything)


def test_parse_split_forms():
    assert parse_split("official") == SplitSpec("official")
    assert parse_split("official:validation").test_part == "validation"
    assert parse_split("random") == SplitSpec("random", seed=0, train_fraction=0.8)
    assert parse_split("random:3:0.7") == SplitSpec("random", seed=3, train_fraction=0.7)
    assert parse_split("indices:a.pth,b.pth") == SplitSpec("indices", train_file="a.pth", test_file="b.pth")
    for bad in ("randm", "random:x", "random:1:1.5", "indices:"):
        with pytest.raises(DatasetError):
            parse_split(bad)


def test_official():
    result = resolve("official", KONIQ_LIKE, "koniq10k")
    assert all(np.array_equal(result[k], KONIQ_LIKE[k]) for k in KONIQ_LIKE)
    validation = resolve("official:validation", KONIQ_LIKE, "koniq10k")["test"]
    assert np.array_equal(validation, KONIQ_LIKE["validation"])
    with pytest.raises(DatasetError, match="live_challenge has no official split"):
        resolve("official", SINGLE, "live_challenge")


def test_random_is_seeded_stable_and_disjoint():
    first = resolve("random:4", SINGLE, "clive")
    assert len(first["train"]) == int(100 * 0.8) and len(first["test"]) == 20
    _disjoint_cover(first, SINGLE["full"])
    again = resolve(SplitSpec("random", seed=4), {"full": SINGLE["full"][::-1].copy()}, "clive")
    assert all(np.array_equal(first[k], again[k]) for k in ("train", "test"))  # input order irrelevant
    tests = [tuple(resolve(f"random:{seed}", SINGLE, "clive")["test"]) for seed in range(10)]
    assert len(set(tests)) == 10  # the 10-split protocol: 10 different splits
    # the order is a hash, not an RNG stream: pinned values hold on any machine and numpy version
    assert hash_order(np.arange(6), 0).tolist() == [0, 4, 2, 5, 3, 1]
    assert hash_order(np.arange(10), 3, 1).tolist() == [4, 8, 0, 2, 1, 3, 5, 7, 9, 6]
    _disjoint_cover(resolve("random:1:0.5", KONIQ_LIKE, "koniq10k"), np.arange(100))


@pytest.mark.parametrize("suffix", [".npy", ".txt", ".json", ".pth"])
def test_index_files(suffix, tmp_path):
    train, test = [12, 8, 40, 9, 33], [10, 11, 100]
    paths = [tmp_path / f"clive_train_indices{suffix}", tmp_path / f"clive_test_indices{suffix}"]
    for path, values in zip(paths, (train, test), strict=True):
        if suffix == ".npy":
            np.save(path, np.asarray(values))
        elif suffix == ".txt":
            path.write_text("\n".join(map(str, values)))
        elif suffix == ".json":
            path.write_text(json.dumps(values))
        else:
            import torch

            torch.save(values, path)  # as the authors' random_split(...).indices
    result = resolve(f"indices:{paths[0]},{paths[1]}", SINGLE, "clive")
    assert result["train"].tolist() == sorted(train) and result["test"].tolist() == sorted(test)
    only_train = resolve(f"indices:{paths[0]}", SINGLE, "clive")
    _disjoint_cover(only_train, SINGLE["full"])


def test_index_file_errors(tmp_path):
    np.save(tmp_path / "train.npy", np.array([1, 2, 8]))
    with pytest.raises(DatasetError, match=r"2 indices are not in clive \(which has 100 images\): 1, 2"):
        resolve(f"indices:{tmp_path / 'train.npy'}", SINGLE, "clive")
    np.save(tmp_path / "a.npy", np.array([8, 9, 10]))
    np.save(tmp_path / "b.npy", np.array([10, 11]))
    with pytest.raises(DatasetError, match="train and test share 1 images: 10"):
        resolve(f"indices:{tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", SINGLE, "clive")
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.5]))
    for name, message in [("bad.json", "not an index file"), ("floats.npy", "flat list of integers"),
                          ("absent.pth", "index file not found"), ("x.csv", "unknown index file type")]:
        if name == "x.csv":
            (tmp_path / name).write_text("1,2")
        with pytest.raises(DatasetError, match=message):
            read_indices(tmp_path / name)
