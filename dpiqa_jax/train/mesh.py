"""One device mesh over every device of every process, and the shardings placed on it.

Axes: `data` (pure data parallelism) and `fsdp` (the batch is split over it too, and so are the
parameters and optimizer state: each array is cut along its largest dimension divisible by the
axis size, the rest replicated). With `fsdp = 1` everything but the batch is replicated.
"""
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dpiqa_jax.errors import UserError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """(data, fsdp) over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    count = len(devices)
    if fsdp < 1 or count % fsdp:
        raise UserError(f"config key 'mesh.fsdp' is {fsdp}: it must divide the {count} devices")
    # Auto axes: XLA propagates shardings through the model (jax's default became Explicit axes).
    return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def batch_size_per_process(mesh: Mesh, global_batch: int, key: str = "batch_size") -> int:
    """The host-local share of a global batch, which must split evenly over every device."""
    if global_batch % mesh.size:
        raise UserError(f"config key {key!r} is {global_batch}: it must be a multiple of the "
                        f"{mesh.size} devices")
    return global_batch // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple, size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by `size` (the first such on ties); else replicate."""
    if size == 1:
        return PartitionSpec()
    dims = [d for d in np.argsort([-n for n in shape], kind="stable") if shape[d] % size == 0]
    if not dims:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[dims[0]] = FSDP
    return PartitionSpec(*spec)


def state_shardings(mesh: Mesh, abstract_tree):
    """Shardings for a tree of arrays or ShapeDtypeStructs (params, optimizer state, ...)."""
    size = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)), abstract_tree)


def host_values(tree):
    """Replicated global arrays -> numpy, on every process (each reads its own copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
