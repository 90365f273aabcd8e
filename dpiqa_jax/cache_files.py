"""The caches on disk, listed and pruned (`dpiqa-jax caches`).

Found anywhere under the folders given (a `cache_dir`, a workdir, a folder of runs, the
compilation cache): the per-image caches `KIND/KEY/` (`example_cache`), their builds left by
killed runs (`KEY.tmp-HOST-PID/`), the stored train steps `dpiqa_steps/KEY.bin` (`exported`) and
their writes cut short (`KEY.bin.tmp-HOST-PID`), JAX's compiled programs (`NAME-SHA256-cache`)
and XLA's GPU autotuning results (one folder). An entry's last use: runs mark ours each time they
use one; JAX's and XLA's have the file system's access time, where it keeps one. Nothing else
under the folders is ever removed.
"""
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import time
from typing import Optional

import numpy as np

from dpiqa_jax.train import example_cache, exported
from dpiqa_jax.train.checkpoint import temporary, temporary_owner

_XLA = re.compile(r"^(?P<name>.+)-[0-9a-f]{64}-cache$")  # JAX's persistent cache entries
_XLA_ATIME = "-atime"  # the companion file of a JAX entry, where JAX's eviction is on
# Where XLA keeps the GPU kernels' autotuning results (one small file per fusion) when JAX's cache is on.
_AUTOTUNE = "xla_gpu_per_fusion_autotune_cache_dir"


@dataclasses.dataclass(frozen=True)
class Entry:
    path: str
    what: str
    size: int  # bytes
    last_used: float  # seconds since the epoch
    running: bool = False  # a build that a live process of this host is writing: never removed


def find(folder: str) -> list[Entry]:
    """Every cache entry under `folder`."""
    entries = []
    for parent, dirs, files in os.walk(folder):
        entries += [_entry(_file_entry, os.path.join(parent, name)) for name in files]
        for name in list(dirs):
            entry = _entry(_folder_entry, os.path.join(parent, name))
            if entry:
                entries.append(entry)
                dirs.remove(name)  # a cache's own files are not entries
    return [entry for entry in entries if entry]


def stale(entries: list[Entry], days: float, now: Optional[float] = None) -> list[Entry]:
    """The entries that no run has used for `days`, less running builds."""
    cutoff = (time.time() if now is None else now) - days * 86400
    return [entry for entry in entries if entry.last_used < cutoff and not entry.running]


def remove(entry: Entry) -> None:
    """Deletes `entry`'s files. A cache folder is first renamed to a build folder of this process,
    so a run never sees it half-removed, and a removal cut short is an abandoned build."""
    if not os.path.isdir(entry.path):
        os.remove(entry.path)
        if _XLA.match(os.path.basename(entry.path)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path.removesuffix("-cache") + _XLA_ATIME)
        return
    doomed = entry.path
    if os.path.basename(doomed) == _AUTOTUNE:  # XLA makes it again; a part of it is still a cache
        shutil.rmtree(doomed)
        return
    if not example_cache.build_owner(os.path.basename(doomed)):
        doomed = temporary(entry.path)
        os.rename(entry.path, doomed)
    shutil.rmtree(doomed)


def _entry(describe, path: str) -> Optional[Entry]:
    try:
        return describe(path)
    except FileNotFoundError:  # gone meanwhile (a build renamed into place, a removal)
        return None


def _file_entry(path: str) -> Optional[Entry]:
    name, stat = os.path.basename(path), os.stat(path)
    if os.path.basename(os.path.dirname(path)) == exported.FOLDER:
        write = temporary_owner(name)  # being written (`checkpoint.atomic_write`), or killed midway
        if write and write[0].endswith((".bin", ".refused")):
            return _unfinished(path, *write[1:], "train step program")
        if name.endswith((".bin", ".refused")):
            what = "train step program" if name.endswith(".bin") else "train step that cannot be stored"
            return Entry(path, what, stat.st_size, stat.st_mtime)
    match = _XLA.match(name)
    if match:  # JAX reads its entries without marking them
        last_used = max(stat.st_atime, stat.st_mtime)
        return Entry(path, f"compiled program ({match['name']})", stat.st_size, last_used)
    return None


def _folder_entry(path: str) -> Optional[Entry]:
    build = example_cache.build_owner(os.path.basename(path))
    if build:
        return _unfinished(path, *build[1:], "cache")
    if os.path.basename(path) == _AUTOTUNE:  # XLA reads its files without marking them
        stats = _files(path)
        last_used = max((max(stat.st_atime, stat.st_mtime) for stat in stats), default=os.stat(path).st_mtime)
        files = f"{len(stats)} file" + "s" * (len(stats) != 1)
        return Entry(path, f"GPU autotuning results ({files})", _size(stats), last_used)
    if os.path.exists(os.path.join(path, example_cache.IDENTITY)):
        return _example_cache(path)
    return None


def _example_cache(path: str) -> Entry:
    identity = example_cache.read_identity(path)
    arrays = sorted(name for name in os.listdir(path) if name.endswith(".npy"))
    what = os.path.basename(os.path.dirname(path)).replace("_", " ")
    try:
        images = np.load(os.path.join(path, arrays[0]), mmap_mode="r").shape[0]
    except (IndexError, ValueError):  # no array, or not an array file
        images = None
    if identity is None or images is None:
        what += " (damaged: a run that needs it makes it again)"
    else:
        what += f": {identity.get('dataset', '?')}, {images} images at {identity.get('image_size', '?')} px"
    last_used = os.stat(os.path.join(path, example_cache.IDENTITY)).st_mtime
    return Entry(path, what, _size(_files(path)), last_used)


def _unfinished(path: str, host: str, pid: int, what: str) -> Entry:
    """A build folder or a file being written (`path`) by process `pid` on `host`."""
    here = host == socket.gethostname()
    running = here and example_cache.alive(pid)
    state = "running" if running else "its process gone" if here else "on another host"
    stats = _files(path) if os.path.isdir(path) else [os.stat(path)]
    last_write = max([os.stat(path).st_mtime] + [stat.st_mtime for stat in stats])
    return Entry(path, f"unfinished {what} (process {pid} on {host}, {state})", _size(stats), last_write,
                 running)


def _files(folder: str) -> list[os.stat_result]:
    """The stats of the files under `folder`."""
    return [os.stat(os.path.join(parent, name)) for parent, _, names in os.walk(folder) for name in names]


def _size(stats: list[os.stat_result]) -> int:
    return sum(stat.st_size for stat in stats)
