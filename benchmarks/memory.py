"""Per-device memory of the full-size teacher's train step (SD-1.5 U-Net, 512 px, batch 16), with
and without FSDP, from XLA's analysis of the compiled step. Nothing is allocated: the parameters,
optimizer state and batch are shapes only, so this runs on a laptop with simulated CPU devices.

    python benchmarks/memory.py                  # 8 simulated devices, bfloat16 compute
    python benchmarks/memory.py --devices 8 --dtype float32 --batch-size 16
    python benchmarks/memory.py --remat off full # what each model.remat keeps (default: all three)

Figures are XLA:CPU's buffer assignment; a GPU/TPU compile differs in temporaries (fusion,
rematerialisation, kernels), not in the arguments (params, Adam moments, batch), which FSDP divides.
XLA:CPU's scheduler undoes rematerialisation (its temporaries are the same whatever `model.remat`
says, even for the tiny teacher), so the table also gives what the backward pass keeps from the
forward pass ("saved"), traced from the jaxpr whatever the backend: that is what remat reduces.
"saved" is with XLA's attention, whose probabilities a fused kernel (cuDNN, Pallas) never keeps:
about 5.8 of the 7.7 GiB per image with `model.remat=off`.
"""
import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    p.add_argument("--fsdp", type=int, nargs="+", help="FSDP sizes to compare (default: 1 and all devices)")
    p.add_argument("--remat", nargs="+", metavar="MODE", help="what the U-Net's layers keep for the "
                   "backward pass (config model.remat: off, matmuls, full; default: all three)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Before JAX starts: the simulated devices, and a fast (unoptimised) CPU codegen that leaves
    # XLA's buffer assignment, hence the figures, unchanged.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count="
                               f"{args.devices} --xla_backend_optimization_level=0")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from dpiqa_jax.models.unet import REMAT  # not at the top: it imports JAX, whose flags come first

    args.remat = args.remat or list(REMAT)
    if set(args.remat) - set(REMAT):
        sys.exit(f"memory.py: --remat takes {', '.join(REMAT)}")
    saved = {remat: saved_bytes(remat, args.batch_size // args.devices, args.dtype) for remat in args.remat}
    rows = [measure(size, remat, args) | {"saved": saved[remat]}
            for remat in args.remat for size in (args.fsdp or (1, args.devices))]
    print(table(rows, args, jax.device_count()))


def saved_bytes(remat: str, images: int, dtype: str) -> int:
    """Bytes of the forward pass's intermediates that the backward pass keeps, for `images` images
    (those of one device: the batch is split over every device, with or without FSDP)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # the list behind print_saved_residuals

    from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
    from dpiqa_jax.teacher import param_shapes

    cfg = TeacherConfig()
    model = DPIQA(cfg, dtype=jnp.dtype(dtype), remat=remat)
    side, latent = cfg.image_size, cfg.latent_size

    def loss(params, images, latents, prompts):
        score, _ = model.apply({"params": params}, images, latents, prompts, method="from_latents")
        return jnp.sum(score.astype(jnp.float32))

    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)  # noqa: E731
    residuals = saved_residuals(loss, param_shapes(cfg), shape(images, side, side, 3),
                                shape(images, latent, latent, 4), shape(1485, cfg.embed_dim))
    return int(sum(np.prod(aval.shape) * aval.dtype.itemsize for aval, why in residuals
                   if "from the argument" not in why))


def measure(fsdp: int, remat: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from dpiqa_jax.checkpoints import with_shardings
    from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
    from dpiqa_jax.teacher import param_shapes
    from dpiqa_jax.train import mesh as mesh_lib
    from dpiqa_jax.train import state as state_lib
    from dpiqa_jax.train.step import compile_train_step

    cfg = TeacherConfig()
    mesh = mesh_lib.make_mesh(fsdp)
    tx = optax.adam(1e-5)
    abstract = state_lib.abstract_state(param_shapes(cfg), tx)
    shardings = state_lib.state_shardings(mesh, abstract)
    state = with_shardings(abstract, shardings)
    n, size, split = args.batch_size, cfg.image_size, mesh_lib.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=split),
             "target": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split),
             "index": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split)}
    embeddings = jax.ShapeDtypeStruct((1485, cfg.embed_dim), jnp.float32, sharding=mesh_lib.replicated(mesh))
    model = DPIQA(cfg, dtype=jnp.dtype(args.dtype), remat=remat)
    step = compile_train_step(model, tx, mesh, shardings, latent_mode="sample", rank_weight=0.0)
    start = time.perf_counter()
    compiled = step.lower(state, batch, embeddings).compile()
    analysis = compiled.memory_analysis()
    state_bytes = sum(_per_device_bytes(x) for x in jax.tree.leaves(state))
    print(f"fsdp={fsdp} remat={remat}: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {"fsdp": fsdp, "remat": remat, "state": state_bytes, "arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes, "aliased": analysis.alias_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "peak": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes}


def _per_device_bytes(x) -> int:
    shard = x.sharding.shard_shape(x.shape)
    count = 1
    for n in shard:
        count *= n
    return count * x.dtype.itemsize


def table(rows, args, devices: int) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    head = (f"Full teacher train step, batch {args.batch_size} (512 px), {args.dtype} compute, float32 "
            f"params and Adam, {devices} devices; GiB per device\n\n"
            "| mesh (data x fsdp) | remat | state (params + Adam) | arguments | outputs | aliased (donated) "
            "| temporaries | peak | saved |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    columns = ("state", "arguments", "outputs", "aliased", "temporaries", "peak", "saved")
    lines = [f"| {devices // r['fsdp']} x {r['fsdp']} | {r['remat']} | "
             + " | ".join(gib(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join([head] + lines)


if __name__ == "__main__":
    main()
