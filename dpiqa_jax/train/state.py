"""The training state: trainable parameters with their Adam state, the frozen VAE apart.

Only what trains gets gradients and optimizer moments: the VAE sits in `frozen`, outside the
optimizer's reach, so it costs neither gradient buffers nor Adam state.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dpiqa_jax.train import mesh as mesh_lib

# Top-level entries that the optimizer never sees: the teacher's VAE, a student's batch statistics
# (updated by its step, not by gradients).
FROZEN = ("vae", "batch_stats")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # trainable parameters: every top-level entry but FROZEN
    frozen: Any  # {'vae': ...} or {'batch_stats': ...}
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step k uses fold_in(rng, k), so a resume draws the same

    def full_params(self, params=None):
        """The model's parameter tree (trainable + frozen), e.g. for `DPIQA.apply`."""
        return merge_params(self.params if params is None else params, self.frozen)


def split_params(params: dict) -> tuple[dict, dict]:
    trainable = {k: v for k, v in params.items() if k not in FROZEN}
    frozen = {k: v for k, v in params.items() if k in FROZEN}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**trainable, **frozen}


def state_shardings(mesh: Mesh, abstract: TrainState) -> TrainState:
    """FSDP shardings (mesh.fsdp_spec) for params, frozen and Adam moments; step and RNG replicated."""
    return TrainState(
        step=mesh_lib.replicated(mesh), rng=mesh_lib.replicated(mesh),
        params=mesh_lib.state_shardings(mesh, abstract.params),
        frozen=mesh_lib.state_shardings(mesh, abstract.frozen),
        opt_state=mesh_lib.state_shardings(mesh, abstract.opt_state))


def abstract_state(param_shapes: dict, tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes (nothing allocated), from the model's parameter shapes."""
    trainable, frozen = split_params(param_shapes)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=jax.eval_shape(tx.init, trainable),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))


def layout(param_shapes: dict, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings on `mesh`), from the model's parameter shapes."""
    abstract = abstract_state(param_shapes, tx)
    return abstract, state_shardings(mesh, abstract)


def place(tree, shardings):
    """Host (numpy or single-device) arrays -> global arrays with `shardings`. Every process must
    hold the same values; each device takes its own slice (works across processes)."""
    def put(x, sharding):
        host = jax.device_get(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def create_state(params: dict, tx: optax.GradientTransformation, rng: jax.Array,
                 shardings: TrainState) -> TrainState:
    """A step-0 state placed on the mesh: the optimizer state is created in place, sharded."""
    trainable, frozen = split_params(params)
    trainable = place(trainable, shardings.params)
    frozen = place(frozen, shardings.frozen)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(trainable)
    return TrainState(step=place(jnp.zeros((), jnp.int32), shardings.step), params=trainable, frozen=frozen,
                      opt_state=opt_state, rng=place(jnp.asarray(rng, jnp.uint32), shardings.rng))
