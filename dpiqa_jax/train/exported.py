"""The train step kept as a serialized `jax.export` program, so that a warm start skips its trace.

JAX's persistent compilation cache keeps the compiled step, but finding it takes JAX's trace and
lowering of the step first: most of a warm start at full size (SD-1.5, batch 16, 2 CPU cores:
13.5 s, against 1.4 s to deserialize and lower the exported step). The program is stored beside
that cache under a key made of all it is a function of: this package's source, the versions of
JAX, Flax and optax, JAX's settings, the devices, the caller's description of the step (config,
model, schedule) and the arguments' shapes, dtypes and shardings. Where it cannot be used (a
program that export refuses) the step is the plain jitted one; a refusal is kept, so the next start
does not try again. The processes of a multi-host run use the stored program only if all of them
have it (`agreed`): different programs must not meet in the step's collectives.
"""
import functools
import hashlib
import json
import os
import sys
from typing import Callable, Optional

import flax
import jax
import jaxlib
import numpy as np
import optax
from jax import export
from jax.experimental import multihost_utils
from jax.sharding import Mesh

import dpiqa_jax
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.checkpoint import atomic_write, mark_used

# Export refuses custom calls that lack its promise of compatibility across versions (cuDNN's fused
# attention, Triton kernels), which a program read back only by the same versions on the same
# devices (its key) does not need: "ALL" lets every one through, whatever a JAX version names them.
ANY_CUSTOM_CALL = [export.DisabledSafetyCheck.custom_call("ALL")]


FOLDER = "dpiqa_steps"


def default_dir() -> Optional[str]:
    """`dpiqa_steps` in JAX's persistent compilation cache, or None where that cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    return os.path.join(cache, FOLDER) if cache else None


class FlatStep:
    """`step(state, *rest) -> (state, metrics)` run as a jitted function of the state's leaves (the
    exported program's arguments must be plain containers), the state donated. `read`: the program
    came from the folder, so this start did not trace the step."""

    def __init__(self, jitted: Callable, treedef, read: bool):
        self.jitted, self.treedef, self.read = jitted, treedef, read

    def __call__(self, state, *rest):
        leaves, metrics = self.jitted(jax.tree.leaves(state), *rest)
        return jax.tree.unflatten(self.treedef, leaves), metrics

    def lower(self, state, *rest):
        return self.jitted.lower(jax.tree.leaves(state), *rest)


def train_step(step: Callable, args: tuple, identity: dict, mesh: Mesh, directory: Optional[str]):
    """`step` (jitted: `step(state, *rest) -> (state, metrics)`, the state donated, the metrics
    replicated) as the stored program for `args` (arrays or ShapeDtypeStructs with shardings) and
    `identity` (all that the step closes over, as JSON), exported and stored if there is none;
    `step` itself where the program cannot be stored or exported."""
    if directory is None:
        return step
    state, *rest = args
    treedef = jax.tree.structure(state)
    path = os.path.join(directory, _key(identity, args, mesh))
    if mark_used(path + ".refused"):
        return step
    shardings = jax.tree.map(lambda x: x.sharding, (jax.tree.leaves(state), *rest))
    outputs = (shardings[0], mesh_lib.replicated(mesh))
    program = _read(path + ".bin")
    read = program is not None
    if not read:
        def flat(leaves, *more):
            state, metrics = step(jax.tree.unflatten(treedef, leaves), *more)
            return jax.tree.leaves(state), metrics

        flat = jax.jit(flat, in_shardings=shardings, out_shardings=outputs, donate_argnums=(0,))
        try:
            program = export.export(flat, disabled_checks=ANY_CUSTOM_CALL)(jax.tree.leaves(state), *rest)
            blob = program.serialize()
        except Exception as error:  # noqa: BLE001 -- any refusal leaves the plain step, which works
            _store(path + ".refused", f"{type(error).__name__}: {error}\n".encode())
            print(f"dpiqa-jax: the train step cannot be stored as a program, so every start traces it "
                  f"(why: {path}.refused)", file=sys.stderr)
            return step
        _store(path + ".bin", blob)
        program = export.deserialize(bytearray(blob))  # the warm start's program, on a cold start too

    def stored_step(leaves, *more):  # the name in JAX's logs and profiles
        return program.call(leaves, *more)

    call = jax.jit(stored_step, in_shardings=shardings, out_shardings=outputs, donate_argnums=(0,))
    return FlatStep(call, treedef, read)


def agreed(ready, step: Callable):
    """`ready` (what `train_step` gave) where every process took the stored program or none did,
    else `step` everywhere: each process decides from its own folder (a host's local cache may
    lack the program or hold a refusal), and all must run the same one."""
    if jax.process_count() == 1:
        return ready
    stored = multihost_utils.process_allgather(np.asarray(isinstance(ready, FlatStep)))
    return ready if stored.all() else step


def read_back(step) -> bool:
    """Whether `step` (what `agreed` gave) is a program read from the folder: no trace on this start."""
    return isinstance(step, FlatStep) and step.read


def _store(path: str, data: bytes) -> None:
    """Writes `data` to `path`, or says why it cannot (a full disk): a cache must not stop the run."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    except OSError as error:
        print(f"dpiqa-jax: cannot keep the train step's program for the next start: {error}", file=sys.stderr)


def _read(path: str):
    """The stored program, or None if there is none or it cannot be read (then it is made again)."""
    try:
        with open(path, "rb") as f:
            program = export.deserialize(bytearray(f.read()))
    except Exception:  # noqa: BLE001 -- no file, or a damaged one: the program is made again
        return None
    mark_used(path)
    return program


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 of this package's Python files (their paths and bytes)."""
    root = os.path.dirname(dpiqa_jax.__file__)
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _key(identity: dict, args: tuple, mesh: Mesh) -> str:
    leaves, treedef = jax.tree.flatten(args)
    parts = {
        "source": source_digest(),
        "versions": [jax.__version__, jaxlib.__version__, flax.__version__, optax.__version__],
        "jax_config": {name: repr(value) for name, value in sorted(jax.config.values.items())},
        "devices": [(d.platform, d.device_kind, d.id) for d in mesh.devices.flat],
        "identity": identity,
        "arguments": [str(treedef)] + [(x.shape, str(x.dtype), bool(getattr(x, "weak_type", False)),
                                        repr(x.sharding)) for x in leaves],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()
