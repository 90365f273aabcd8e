"""The frozen teacher's feature maps of the train images, computed once for distillation.

With mean latents the teacher's map is a function of the image alone, the same at every step, so
one pass over the train part (config key `student.cache_teacher`) replaces a teacher forward pass
in every step. Each process keeps its own copy in `WORKDIR/teacher_maps/process_N.npy`, read as a
memory map; `process_N.json` beside it says which teacher and examples made it and is written last,
so a file without it (a killed build) is never used. A rerun reuses the file when the teacher, the
train examples and the map shape are the same, and rebuilds it otherwise.
"""
import hashlib
import json
import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.train.checkpoint import atomic_write

FOLDER = "teacher_maps"


def params_digest(params) -> str:
    """A digest of every parameter's sum and sum of squares (computed on the devices, so sharded
    parameters need no gathering): it tells one teacher from another without hashing its bytes."""
    leaves = jax.tree.leaves(params)
    stats = jax.jit(lambda xs: [jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.vdot(x, x).astype(jnp.float32)])
                                for x in xs])(leaves)
    values = np.concatenate([np.asarray(jax.device_get(s), np.float64) for s in stats])
    return hashlib.sha256(values.tobytes()).hexdigest()


class TeacherMaps:
    """Rows of teacher maps keyed by example index; `join` adds a batch's maps as 'teacher_map'."""

    def __init__(self, indices: np.ndarray, maps: np.ndarray):
        self.indices, self.maps = indices, maps  # indices sorted, one per row of maps

    def join(self, batch: dict) -> dict:
        rows = np.minimum(np.searchsorted(self.indices, batch["index"]), len(self.indices) - 1)
        if np.any(self.indices[rows] != batch["index"]):
            raise RuntimeError("a train batch holds an example that the teacher map cache lacks")
        return {**batch, "teacher_map": np.asarray(self.maps[rows])}


def load_or_build(workdir: str, identity: dict, indices: np.ndarray, map_shape: tuple,
                  compute: Callable[[], Iterable[dict]]) -> TeacherMaps:
    """The cache of `workdir` if `identity` (what made it) matches, else a new one from `compute()`:
    batches {'map', 'index', 'mask'} (host arrays) that cover every index of `indices`."""
    indices = np.sort(np.asarray(indices, np.int64))
    identity = {**identity, "examples": hashlib.sha256(indices.tobytes()).hexdigest(),
                "map_shape": list(map_shape)}
    base = os.path.join(workdir, FOLDER, f"process_{jax.process_index()}")
    if _read_identity(base + ".json") != identity:
        _build(base, identity, indices, map_shape, compute)
    return TeacherMaps(indices, np.load(base + ".npy", mmap_mode="r"))


def _build(base: str, identity: dict, indices: np.ndarray, map_shape: tuple, compute) -> None:
    """Writes `base`.npy from `compute()`, then `base`.json (the mark of a complete file)."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if os.path.exists(base + ".json"):
        os.remove(base + ".json")  # the maps below are about to change
    maps = np.lib.format.open_memmap(base + ".npy", mode="w+", dtype=np.float32,
                                     shape=(len(indices), *map_shape))
    filled = np.zeros(len(indices), bool)
    for batch in compute():
        keep = batch["mask"].astype(bool) & np.isin(batch["index"], indices)
        rows = np.searchsorted(indices, batch["index"][keep])
        maps[rows] = batch["map"][keep]
        filled[rows] = True
    if not filled.all():
        raise RuntimeError(f"the teacher map pass missed {int((~filled).sum())} train examples")
    maps.flush()
    atomic_write(base + ".json", lambda f: f.write(json.dumps(identity, indent=1).encode()))


def _read_identity(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

