"""`dpiqa-jax caches`: every kind of cache that runs leave is listed with what made it, its size and
its last use; `--unused-for DAYS` removes exactly those that no run has used for that long, and
nothing else; runs mark the caches they use."""
import datetime
import os
import re
import socket
import time

import pytest
from test_example_cache import INDICES, SHAPES, passes
from train_helpers import CLI, check, environment, run

from dpiqa_jax import cache_files
from dpiqa_jax.cli import main
from dpiqa_jax.train import example_cache

pytest_plugins = ("train_fixtures",)  # the session fixtures train_root and smoke_run

DAY = 86400
NOW = time.time()
SHA = "0123456789abcdef" * 4
MIB = 2**20
DEAD_PID = 4_000_000  # above Linux's largest pid: never a live process
HOST = socket.gethostname()
OLD = ("old posteriors", "dead build", "old program", "refused", "dead write", "old compiled", "autotuning")
NEW = ("new posteriors", "new program", "new compiled")


def aged(path, days):
    os.utime(path, (NOW - days * DAY, NOW - days * DAY))
    return path


def posteriors(root, dataset, days):
    """A per-image cache made as runs make them, last used `days` ago; its folder."""
    identity = {"vae": dataset, "dataset": dataset, "image_size": 64}
    example_cache.load_or_build(str(root), "vae_posteriors", identity, INDICES, SHAPES, passes([]))
    folder = next(str(path) for path in (root / "vae_posteriors").iterdir()
                  if (example_cache.read_identity(path) or {}).get("dataset") == dataset)
    aged(os.path.join(folder, example_cache.IDENTITY), days)
    return folder


def unfinished(parent, pid, days):
    """The folder a build of a per-image cache writes in, left `days` ago by process `pid`."""
    folder = parent / f"{'f' * 20}.tmp-{socket.gethostname()}-{pid}"
    folder.mkdir(parents=True)
    (folder / "mean.npy").write_bytes(b"m" * MIB)
    aged(folder / "mean.npy", days)
    return str(aged(folder, days))


def file(path, days, size=MIB):
    path.write_bytes(b"p" * size)
    return str(aged(path, days))


def autotuning(xla):
    """XLA's GPU autotuning results, written 45 days ago, the last of them read 33 days ago."""
    folder = xla / "xla_gpu_per_fusion_autotune_cache_dir"
    folder.mkdir()
    for name, read in (("Abc-_1.textproto", 45), ("Def-_2.textproto", 33)):
        file(folder / name, 45, 1000)
        os.utime(folder / name, (NOW - read * DAY, NOW - 45 * DAY))
    return str(folder)


@pytest.fixture
def caches(tmp_path):
    """A cache_dir and a compilation cache holding every kind of entry, old and recent, beside files
    that are not caches; {name: path}."""
    shared, xla = tmp_path / "shared", tmp_path / "xla"
    (xla / "dpiqa_steps").mkdir(parents=True)
    assert not example_cache.alive(DEAD_PID)
    paths = {
        "old posteriors": posteriors(shared, "koniq10k", 40),
        "new posteriors": posteriors(shared, "spaq", 2),
        "dead build": unfinished(shared / "vae_posteriors", DEAD_PID, 40),
        "running build": unfinished(shared / "vae_posteriors", os.getpid(), 40),
        "old program": file(xla / "dpiqa_steps" / f"{SHA}.bin", 40, 3 * MIB),
        "new program": file(xla / "dpiqa_steps" / f"{SHA[::-1]}.bin", 1),
        "refused": file(xla / "dpiqa_steps" / f"{SHA}.refused", 35, 100),
        # A program's write killed midway (checkpoint.atomic_write's temporary), and one under way.
        "dead write": file(xla / "dpiqa_steps" / f"{SHA}.bin.tmp-{HOST}-{DEAD_PID}", 33),
        "running write": file(xla / "dpiqa_steps" / f"{SHA}.bin.tmp-{HOST}-{os.getpid()}", 33),
        "old compiled": file(xla / f"jit_train_step-{SHA}-cache", 31),
        "autotuning": autotuning(xla),
        "new compiled": file(xla / f"jit_init-{SHA}-cache", 0.5),
    }
    file(xla / f"jit_train_step-{SHA}-atime", 31, 8)  # JAX's companion of an entry
    for other in (shared / "notes-cache", shared / "checkpoints" / "latest" / "params", xla / "README"):
        other.parent.mkdir(parents=True, exist_ok=True)
        file(other, 90, 10)
    return paths


def cli(capsys, *args):
    code = main(["caches", *map(str, args)])
    return code, capsys.readouterr().out.splitlines()


def test_every_kind_of_entry_is_listed_oldest_use_first_with_what_made_it(caches, tmp_path, capsys):
    code, lines = cli(capsys, tmp_path / "shared", tmp_path / "xla")
    assert code == 0
    rows = [list(re.fullmatch(r"(\S+ \S+) +(\S+ \S+)  (\S+)  (.+)", line).groups()) for line in lines[:-1]]
    paths = [row[2] for row in rows]
    assert sorted(paths) == sorted(caches.values())  # every entry once, nothing else
    assert set(paths[:9]) == {caches[name] for name in OLD + ("running build", "running write")}
    assert paths[9:] == [caches[name] for name in NEW]
    row = {name: rows[paths.index(path)] for name, path in caches.items()}
    assert row["new program"][:2] == [datetime.datetime.fromtimestamp(NOW - DAY).strftime("%Y-%m-%d %H:%M"),
                                      "1.0 MiB"]
    assert row["old program"][1:] == ["3.0 MiB", caches["old program"], "train step program"]
    assert row["refused"][3] == "train step that cannot be stored"
    assert row["old compiled"][3] == "compiled program (jit_train_step)"
    assert row["autotuning"] == [datetime.datetime.fromtimestamp(NOW - 33 * DAY).strftime("%Y-%m-%d %H:%M"),
                                 "2.0 KiB", caches["autotuning"], "GPU autotuning results (2 files)"]
    assert row["old posteriors"][3] == "vae posteriors: koniq10k, 4 images at 64 px"
    host = socket.gethostname()
    assert row["dead build"][3] == f"unfinished cache (process {DEAD_PID} on {host}, its process gone)"
    assert row["running build"][3].endswith(", running)")
    assert row["dead write"][1:] == ["1.0 MiB", caches["dead write"],
                                     f"unfinished train step program (process {DEAD_PID} on {host}, "
                                     "its process gone)"]
    assert row["running write"][3].endswith(", running)")
    sizes = {entry.path: entry.size for entry in cache_files.find(str(tmp_path))}
    npy = [os.path.join(caches["old posteriors"], f"{name}.npy") for name in SHAPES]
    assert sizes[caches["old posteriors"]] == sum(map(os.path.getsize, npy)) + os.path.getsize(
        os.path.join(caches["old posteriors"], example_cache.IDENTITY))
    assert lines[-1] == f"12 entries, {sum(sizes.values()) / MIB:.1f} MiB"


def test_unused_for_removes_the_entries_unused_that_long_and_nothing_else(caches, tmp_path, capsys):
    before = {path for path in map(str, tmp_path.rglob("*"))}
    code, lines = cli(capsys, tmp_path / "shared", tmp_path / "xla", "--unused-for", 30)
    assert code == 0
    removed = [line.split()[1] for line in lines[:-1]]
    assert sorted(removed) == sorted(caches[name] for name in OLD)
    assert lines[-1] == "removed 7 entries (6.0 MiB); kept 5 (4.0 MiB)"
    after = {path for path in map(str, tmp_path.rglob("*"))}
    gone = {path for path in before - after if not any(path.startswith(caches[name] + "/") for name in OLD)}
    assert gone == {caches[name] for name in OLD} | {str(tmp_path / "xla" / f"jit_train_step-{SHA}-atime")}
    assert not [name for name in os.listdir(tmp_path / "shared" / "vae_posteriors") if ".tmp-" in name
                and name != os.path.basename(caches["running build"])]  # no folder left by the removal
    code, lines = cli(capsys, tmp_path / "shared", tmp_path / "xla")
    assert lines[-1].startswith("5 entries")


def test_a_run_marks_the_per_image_cache_it_uses(tmp_path):
    folder = posteriors(tmp_path, "koniq10k", 40)
    identity = {"vae": "koniq10k", "dataset": "koniq10k", "image_size": 64}
    calls = []
    example_cache.load_or_build(str(tmp_path), "vae_posteriors", identity, INDICES, SHAPES, passes(calls))
    assert not calls  # used, not made again
    (entry,) = cache_files.find(str(tmp_path))
    assert entry.path == folder and entry.last_used > NOW - 60


def test_a_removed_cache_is_made_again_by_the_next_run(tmp_path):
    folder = posteriors(tmp_path, "koniq10k", 40)
    (entry,) = cache_files.find(str(tmp_path))
    cache_files.remove(entry)
    assert not os.path.exists(folder) and os.listdir(tmp_path / "vae_posteriors") == []
    assert posteriors(tmp_path, "koniq10k", 0) == folder


@pytest.mark.parametrize("args, message", [
    (["/no/such/folder"], "dpiqa-jax caches: error: /no/such/folder: no such folder"),
    (["--unused-for", "0"], "argument --unused-for: expected a positive number of days, got '0'"),
    (["--unused-for", "week"], "argument --unused-for: expected a positive number of days, got 'week'"),
])
def test_bad_arguments_are_one_line(args, message, capsys):
    try:
        code = main(["caches", *args])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and stderr[-1].endswith(message)


def test_a_real_runs_caches_are_found_in_its_workdir_and_the_default_compilation_cache(smoke_run, train_root):
    env = environment(train_root)  # JAX_COMPILATION_CACHE_DIR: the runs' compilation cache
    lines = check(run(CLI + ["caches", str(smoke_run)], env)).stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("vae posteriors: synthetic_iqa/tiny, 24 images at 64 px")
    lines = check(run(CLI + ["caches"], env)).stdout.splitlines()
    assert any(line.endswith("train step program") for line in lines)
    assert any("compiled program (jit_" in line for line in lines)
