"""scripts/ten_splits.py as the README runs it, on the demo's tiny teacher: one workdir per seeded
split, a report over the splits, finished splits skipped on a rerun, a failed split named."""
import json
import statistics
import sys

import pytest
from train_helpers import SMOKE, check, environment, results, run

pytest_plugins = ("train_fixtures",)  # the session fixture train_root (synthetic_iqa/tiny prepared)
pytestmark = pytest.mark.slow  # two short trainings


def test_each_split_trains_once_and_the_report_summarises_them(train_root, tmp_path):
    root = tmp_path / "splits"
    script = [sys.executable, "scripts/ten_splits.py", "--config", SMOKE, "--workroot", str(root)]
    # the smoke run's schedule, so that its stored step and compiled programs serve these runs too
    train_args = ["--", f"--config.dataset.data_dir={train_root / 'tfds'}"]
    first = check(run(script + ["--seeds", "0", "1"] + train_args, environment(train_root)))
    assert first.stdout.count("+ dpiqa-jax train") == 2 and "--config.dataset.split=random:1" in first.stdout
    report = json.loads((root / "ten_splits.json").read_text())
    srcc = [results(root / f"split_{seed}")["best"]["srcc"]["metrics"]["srcc"] for seed in (0, 1)]
    assert report["splits"] == [0, 1] and report["per_split"]["best_srcc"] == srcc
    assert report["best_srcc"]["median"] == pytest.approx(statistics.median(srcc))
    assert f"| best_srcc | {statistics.median(srcc):.4f} |" in first.stdout

    again = check(run(script + ["--seeds", "0", "1"] + train_args, environment(train_root)))
    assert "+ dpiqa-jax train" not in again.stdout  # finished splits are not trained again

    failed = run(script + ["--seeds", "2"] + train_args + ["--config.batch_size=0"], environment(train_root))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "ten_splits: split 2 stopped (exit code 2); run the same command again to resume")
