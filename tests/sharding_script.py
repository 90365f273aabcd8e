"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices: a few train steps of the
stand-in teacher on several meshes; prints their losses, final params and shardings as JSON."""
import json
import sys

import jax
import numpy as np
from train_fakes import FakeTeacher, adam, fake_batch, fake_params

from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train import state as state_lib
from dpiqa_jax.train.step import compile_train_step


def run(mesh, steps: int = 4) -> dict:
    tx, params = adam(), fake_params()
    abstract = state_lib.abstract_state(jax.eval_shape(lambda: params), tx)
    shardings = state_lib.state_shardings(mesh, abstract)
    state = state_lib.create_state(params, tx, jax.random.PRNGKey(0), shardings)
    step = compile_train_step(FakeTeacher(), tx, mesh, shardings, latent_mode="sample", rank_weight=0.5)
    losses = []
    for i in range(steps):
        state, metrics = step(state, fake_batch(seed=i), np.ones((4, 8), np.float32))
        losses.append(float(metrics["loss"]))
    mu = state.opt_state[0].mu["body"]["kernel"]
    return {"losses": losses, "body": np.asarray(state.params["body"]["kernel"]).tolist(),
            "body_spec": str(state.params["body"]["kernel"].sharding.spec), "mu_spec": str(mu.sharding.spec),
            "vae_spec": str(state.frozen["vae"]["kernel"].sharding.spec)}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    meshes = {"one": mesh_lib.make_mesh(1, jax.devices()[:1]), "data8": mesh_lib.make_mesh(1),
              "fsdp8": mesh_lib.make_mesh(8), "data2_fsdp4": mesh_lib.make_mesh(4)}
    json.dump({name: run(mesh) for name, mesh in meshes.items()}, sys.stdout)
