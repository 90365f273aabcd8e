"""Arrays per train example computed once by a frozen model and kept on disk, joined to batches.

Two users: distillation's teacher maps (`student.cache_teacher`) and the teacher's VAE posteriors
(`model.cache_posteriors`). Both are functions of the image alone, the same at every step, so one
pass over the train part replaces a frozen forward pass in every step. Each process keeps its own
copy in `WORKDIR/FOLDER/process_N.NAME.npy` (float32, read as memory maps); `process_N.json`
beside them says which model and examples made them and is written last, so files without it (a
killed build) are never used. A rerun reuses the files when the model, the train examples and the
shapes are the same, and rebuilds them otherwise.
"""
import hashlib
import json
import os
import sys
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.checkpoint import atomic_write


def params_digest(params) -> str:
    """A digest of every parameter's sum and sum of squares (computed on the devices, so sharded
    parameters need no gathering): it tells one model from another without hashing its bytes."""
    leaves = jax.tree.leaves(params)
    stats = jax.jit(lambda xs: [jnp.stack([jnp.sum(x, dtype=jnp.float32), jnp.vdot(x, x).astype(jnp.float32)])
                                for x in xs])(leaves)
    values = np.concatenate([np.asarray(jax.device_get(s), np.float64) for s in stats])
    return hashlib.sha256(values.tobytes()).hexdigest()


class ExampleCache:
    """Rows of named arrays keyed by example index; `join` adds a batch's rows under their names."""

    def __init__(self, indices: np.ndarray, arrays: dict[str, np.ndarray]):
        self.indices, self.arrays = indices, arrays  # indices sorted, one per row of each array

    def join(self, batch: dict) -> dict:
        rows = np.minimum(np.searchsorted(self.indices, batch["index"]), len(self.indices) - 1)
        if np.any(self.indices[rows] != batch["index"]):
            raise RuntimeError("a train batch holds an example that the cache lacks")
        return {**batch, **{name: np.asarray(array[rows]) for name, array in self.arrays.items()}}


def load_or_build(workdir: str, folder: str, identity: dict, indices: np.ndarray, shapes: dict[str, tuple],
                  compute: Callable[[], Iterable[dict]]) -> ExampleCache:
    """The cache in `workdir/folder` if `identity` (what made it) matches, else a new one from
    `compute()`: batches {NAME: ..., 'index', 'mask'} (host arrays), one NAME per entry of `shapes`
    (an example's shape), that cover every index of `indices`."""
    indices = np.sort(np.asarray(indices, np.int64))
    identity = {**identity, "examples": hashlib.sha256(indices.tobytes()).hexdigest(),
                "shapes": {name: list(shape) for name, shape in shapes.items()}}
    base = os.path.join(workdir, folder, f"process_{jax.process_index()}")
    if _read_identity(base + ".json") != identity:
        if jax.process_index() == 0:  # the pass comes before the first step: say why it waits
            print(f"dpiqa-jax: {os.path.join(workdir, folder)}: one pass over the {len(indices)} train "
                  f"examples, kept for later runs in this workdir", file=sys.stderr)
        _build(base, identity, indices, shapes, compute)
    return ExampleCache(indices, {name: np.load(f"{base}.{name}.npy", mmap_mode="r") for name in shapes})


def join_from_pass(workdir: str, folder: str, data, step: Callable, inputs, shapes: dict[str, tuple],
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
    return load_or_build(workdir, folder, identity, data.train_indices, shapes, compute).join


def _build(base: str, identity: dict, indices: np.ndarray, shapes: dict[str, tuple], compute) -> None:
    """Writes `base`.NAME.npy from `compute()`, then `base`.json (the mark of complete files)."""
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if os.path.exists(base + ".json"):
        os.remove(base + ".json")  # the arrays below are about to change
    arrays = {name: np.lib.format.open_memmap(f"{base}.{name}.npy", mode="w+", dtype=np.float32,
                                              shape=(len(indices), *shape))
              for name, shape in shapes.items()}
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
    atomic_write(base + ".json", lambda f: f.write(json.dumps(identity, indent=1).encode()))


def _read_identity(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
