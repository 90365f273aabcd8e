"""Arrays per train example computed once by a frozen model and kept on disk, joined to batches.

Two users: distillation's teacher maps (`student.cache_teacher`) and the teacher's VAE posteriors
(`model.cache_posteriors`). Both are functions of the image alone, the same at every step, so one
pass over the train part replaces a frozen forward pass in every step.

A cache is the folder `ROOT/KIND/KEY/` (`ROOT` the workdir, or the config's `cache_dir` shared by
runs), `KEY` a digest of what made it: the model's parameters, the dataset, the train examples, the
image size, the shapes. It holds `NAME.npy` (float32, read as memory maps) and `identity.json` (that
record; its modification time is the cache's last use, for `dpiqa-jax caches`). A build writes a
folder of its own and renames it into place when complete, so a killed build is never used; when
runs build the same cache at once, the first to finish renames its folder into place and the others
drop theirs. The processes of a multi-host run decide together: the pass runs when any of them lacks
the cache, and process 0 writes for every process that sees its files (a shared file system), the
others for themselves (a local `cache_dir`).
"""
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dpiqa_jax.errors import UserError
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.checkpoint import atomic_write, mark_used, temporary, temporary_owner


def params_digest(params) -> str:
    """A digest of every parameter's bits, the same however the parameters are sharded: per array,
    two integer sums of its bit patterns (plain, and weighted by position), which wrap modulo 2**32
    in any order of summation (float sums do not: the same VAE on another mesh got another digest,
    so runs sharing a cache_dir made the cache again). Computed on the devices, so sharded
    parameters need no gathering; the names, shapes and dtypes are hashed beside the sums."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sums = jax.jit(lambda xs: [_bit_sums(x) for x in xs])([leaf for _, leaf in flat])
    digest = hashlib.sha256()
    for (path, leaf), pair in zip(flat, jax.device_get(sums), strict=True):
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.shape} {leaf.dtype};".encode())
        digest.update(np.asarray(pair, np.uint32).tobytes())
    return digest.hexdigest()


_BITS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_MIX = 0x9E3779B1  # an odd multiplier (2**32 / golden ratio): each position weighs its bits differently


def _bit_sums(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, _BITS[x.dtype.itemsize]).astype(jnp.uint32)
    position = jnp.zeros(x.shape, jnp.uint32)  # row-major, from iotas: no reshape of a sharded array
    for axis in range(x.ndim):
        stride = np.uint32(math.prod(x.shape[axis + 1:]))
        position += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * stride
    weight = position * np.uint32(_MIX) + np.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


class ExampleCache:
    """Rows of named arrays keyed by example index; `join` adds a batch's rows under their names."""

    def __init__(self, indices: np.ndarray, arrays: dict[str, np.ndarray]):
        self.indices, self.arrays = indices, arrays  # indices sorted, one per row of each array

    def join(self, batch: dict) -> dict:
        rows = np.minimum(np.searchsorted(self.indices, batch["index"]), len(self.indices) - 1)
        if np.any(self.indices[rows] != batch["index"]):
            raise RuntimeError("a train batch holds an example that the cache lacks")
        return {**batch, **{name: np.asarray(array[rows]) for name, array in self.arrays.items()}}


IDENTITY = "identity.json"
KEY_LENGTH = 20  # hex digits of a cache's folder name
_KEY = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")


def load_or_build(root: str, kind: str, identity: dict, indices: np.ndarray, shapes: dict[str, tuple],
                  compute: Callable[[], Iterable[dict]]) -> ExampleCache:
    """The cache of `identity` (what made it) under `root/kind`, built from `compute()` if there is
    none: batches {NAME: ..., 'index', 'mask'} (host arrays), one NAME per entry of `shapes` (an
    example's shape), that cover every index of `indices`. With several processes `compute()` is a
    collective: they all run it when any of them lacks the cache, and only those that lack it and do
    not see process 0's files write a copy (on a shared file system, process 0 alone)."""
    indices = np.sort(np.asarray(indices, np.int64))
    identity = {**identity, "examples": hashlib.sha256(indices.tobytes()).hexdigest(),
                "shapes": {name: list(shape) for name, shape in shapes.items()}}
    folder = cache_folder(root, kind, identity)
    lacking = np.array([read_identity(folder) != identity])
    several = jax.process_count() > 1
    if several:
        lacking = multihost_utils.process_allgather(lacking).ravel()  # every process's answer, in order
    if lacking.any():
        me = jax.process_index()
        if me == 0:  # the pass comes before the first step: say why it waits
            print(f"dpiqa-jax: {folder}: one pass over the {len(indices)} train examples, kept for "
                  f"later runs", flush=True)
        # Process 0 writes for those that see its files; the others that lack the cache, for themselves.
        shared = several and _sees_process_0s_files(os.path.dirname(folder))
        write = bool(lacking[me]) and (me == 0 or not shared or not lacking[0])
        _build(folder, identity, indices, shapes, _counted(compute, len(indices), kind), write)
        if several:
            multihost_utils.sync_global_devices(f"example cache built: {kind}")
            if read_identity(folder) != identity:
                raise RuntimeError(f"{folder}: process 0 built this cache, but this process cannot read it")
    mark_used(os.path.join(folder, IDENTITY))
    return ExampleCache(indices, {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
                                  for name in shapes})


def cache_folder(root: str, kind: str, identity: dict) -> str:
    """`root/kind/KEY`, KEY a digest of `identity`."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:KEY_LENGTH]
    return os.path.join(os.path.expanduser(root), kind, key)


def join_from_pass(root: str, kind: str, data, step: Callable, inputs, shapes: dict[str, tuple],
                   identity: dict) -> Callable[[dict], dict]:
    """The join of the cache that `step(inputs, eval batch)` fills in one pass over `data`'s train
    part (`step` returns `shapes`' names, 'index' and 'mask'; `inputs` are on the mesh). `identity`
    says what made it beyond the dataset and image size: a `params_digest` of the parameters that
    the arrays depend on, the compute dtype."""
    jitted = jax.jit(step, in_shardings=(jax.tree.map(lambda x: x.sharding, inputs),
                                         mesh_lib.batch_sharding(data.mesh)),
                     out_shardings=mesh_lib.replicated(data.mesh))
    identity = {**identity, "dataset": data.name, "image_size": data.image_size}
    compute = lambda: (mesh_lib.host_values(jitted(inputs, batch)) for batch in data.eval_batches("train"))
    return load_or_build(root, kind, identity, data.train_indices, shapes, compute).join


def _counted(compute: Callable[[], Iterable[dict]], total: int, kind: str) -> Callable[[], Iterable[dict]]:
    """`compute` whose batches move a progress bar of the pass (process 0's, as the train bar): on
    a large dataset the pass takes minutes before the first step."""
    def batches():
        with tqdm(total=total, unit="img", desc=kind, disable=jax.process_index() != 0,
                  dynamic_ncols=True) as bar:
            for batch in compute():
                bar.update(int(batch["mask"].sum()))  # the padding of the last batch not counted
                yield batch
    return batches


def _build(folder: str, identity: dict, indices: np.ndarray, shapes: dict[str, tuple], compute,
           write: bool) -> None:
    """Fills a folder of this process's with NAME.npy from `compute()` and `identity.json`, then
    renames it to `folder`; without `write`, only runs `compute()` (a collective of the processes)."""
    if not write:
        for _ in compute():
            pass
        return
    tmp = temporary(folder)  # renamed to `folder` once complete
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    _remove_abandoned(folder)
    os.makedirs(tmp)
    arrays = _allocate(folder, tmp, {name: (len(indices), *shape) for name, shape in shapes.items()})
    filled = np.zeros(len(indices), bool)
    for batch in compute():
        keep = batch["mask"].astype(bool) & np.isin(batch["index"], indices)
        rows = np.searchsorted(indices, batch["index"][keep])
        for name, array in arrays.items():
            array[rows] = batch[name][keep]
        filled[rows] = True
    if not filled.all():
        raise RuntimeError(f"the pass over the train part missed {int((~filled).sum())} examples")
    for array in arrays.values():
        array.flush()
    del arrays
    atomic_write(os.path.join(tmp, IDENTITY), lambda f: f.write(json.dumps(identity, indent=1).encode()))
    try:
        os.rename(tmp, folder)
    except OSError:  # `folder` exists: complete (another run's, the same arrays) or not
        if read_identity(folder) == identity:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(folder, ignore_errors=True)  # damaged by hand: ours replaces it
        os.rename(tmp, folder)


def build_owner(name: str) -> Optional[tuple[str, str, int]]:
    """(KEY, host, pid) of a cache's build folder's name (`checkpoint.temporary` of its folder), or
    None for any other name."""
    owner = temporary_owner(name)
    return owner if owner and _KEY.fullmatch(owner[0]) else None


def _allocate(folder: str, tmp: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """float32 arrays NAME.npy in `tmp` as writable memory maps, their disk space reserved now: on a
    disk that fills up during the pass, a write to a mapped page would kill the process (SIGBUS)."""
    try:
        arrays = {}
        for name, shape in shapes.items():
            path = os.path.join(tmp, f"{name}.npy")
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return arrays
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        size = human_size(sum(4 * math.prod(shape) for shape in shapes.values()))
        raise UserError(f"{folder}: no room for this cache ({size}): {error.strerror}; free space there "
                        f"(`dpiqa-jax caches FOLDER --unused-for DAYS` removes old caches) or set cache_dir "
                        f"to another folder") from None


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"


def _sees_process_0s_files(parent: str) -> bool:
    """Whether this process sees the files that process 0 writes in `parent` (a file system they
    share); True on process 0. A collective: every process calls it."""
    os.makedirs(parent, exist_ok=True)
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint8))
    probe = os.path.join(parent, f".probe-{bytes(np.asarray(token, np.uint8)).hex()}")
    if jax.process_index() == 0:
        open(probe, "w").close()
    multihost_utils.sync_global_devices("example cache probe written")  # the same name on every process
    seen = os.path.exists(probe)
    multihost_utils.sync_global_devices("example cache probe looked for")
    if jax.process_index() == 0:
        os.remove(probe)
    return seen


def _remove_abandoned(folder: str) -> None:
    """Removes this host's build folders of `folder` whose process is gone (killed builds), and
    this process's own."""
    parent, ours = os.path.dirname(folder), (os.path.basename(folder), socket.gethostname())
    for name in os.listdir(parent):
        key, host, pid = build_owner(name) or (None, None, None)
        if (key, host) == ours and (pid == os.getpid() or not alive(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def read_identity(folder: str):
    try:
        with open(os.path.join(folder, IDENTITY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
