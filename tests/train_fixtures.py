"""Session fixtures of the training tests (load with `pytest_plugins = ("train_fixtures",)`): the
prepared `synthetic_iqa/tiny` records and one uninterrupted 1-device `demo.py:smoke` run, each made
once per test session, even across pytest-xdist workers (a file lock guards each)."""
import sys
from pathlib import Path

import pytest
from train_helpers import check, environment, locked, run, shared_root, train_command


@pytest.fixture(scope="session")
def train_root(tmp_path_factory) -> Path:
    """The shared folder, with synthetic_iqa/tiny prepared in root/tfds."""
    root = shared_root(tmp_path_factory)
    with locked(root / "tfds"):
        if not (root / "tfds" / "done").exists():
            code = "import sys, dpiqa_jax.data.source as s; s.prepare('synthetic_iqa/tiny', sys.argv[1])"
            check(run([sys.executable, "-c", code, str(root / "tfds")], environment(root)))
            (root / "tfds" / "done").touch()
    return root


@pytest.fixture(scope="session")
def smoke_run(train_root) -> Path:
    """The workdir of one uninterrupted 1-device `demo.py:smoke` run: the reference of the others."""
    workdir = train_root / "smoke_1device"
    with locked(workdir):
        if not (workdir / "results.json").exists():
            check(run(train_command(workdir, train_root), environment(train_root)))
    return workdir
