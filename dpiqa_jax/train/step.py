"""The teacher's train and eval steps: pure functions, jitted once with explicit shardings.

`train_step(state, batch, embeddings)` -> (state, metrics). The VAE posterior is computed outside
the differentiated function (the VAE is frozen), or comes cached in the batch (`POSTERIOR` keys,
`model.cache_posteriors`); latents are the posterior draw of the authors ('sample', with a key
folded from the step number, so a resumed run draws the same) or its mean.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dpiqa_jax.models.dpiqa import DPIQA
from dpiqa_jax.models.vae import latents_from_posterior
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.state import TrainState

LATENTS = ("sample", "mean")
POSTERIOR = ("posterior_mean", "posterior_std")  # batch keys of cached VAE posteriors


def ranking_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """SPEC's pairwise hinge, over all pairs i < j at once: margin 0.25 * std(targets) (unbiased, as
    torch.std), loss mean(max(0, -sign(t_i - t_j) * (p_i - p_j) + margin))."""
    n = pred.shape[0]
    margin = 0.25 * jnp.std(target, ddof=1)
    hinge = jnp.maximum(0.0, -jnp.sign(target[:, None] - target[None, :]) * (pred[:, None] - pred[None, :])
                        + margin)
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    return jnp.sum(jnp.where(upper, hinge, 0.0)) / (n * (n - 1) / 2)


def encode(model: DPIQA, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The VAE posterior (mean, std) of `images`, computed."""
    return model.apply({"params": params}, images, method="encode")


def posterior(model: DPIQA, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """The VAE posterior (mean, std) of the batch's images: cached in the batch, else computed."""
    if POSTERIOR[0] in batch:  # stored as float32; the VAE's own outputs are in the compute dtype
        return tuple(batch[key].astype(model.dtype) for key in POSTERIOR)
    return encode(model, params, batch["image"])


def posterior_step(params, batch: dict, *, model: DPIQA) -> dict:
    """The posteriors of a (padded) batch, for the cache."""
    mean, std = encode(model, params, batch["image"])
    return {POSTERIOR[0]: mean, POSTERIOR[1]: std, "index": batch["index"], "mask": batch["mask"]}


def latents(model: DPIQA, mean: jax.Array, std: jax.Array, rng, mode: str) -> jax.Array:
    key = rng if mode == "sample" else None
    return jax.lax.stop_gradient(latents_from_posterior(mean, std, model.config.vae.scaling_factor, key))


def train_step(state: TrainState, batch: dict, embeddings: jax.Array, *, model: DPIQA,
               tx: optax.GradientTransformation, latent_mode: str = "sample", rank_weight: float = 0.0):
    rng = jax.random.fold_in(state.rng, state.step)
    images, target = batch["image"], batch["target"].astype(jnp.float32)
    z = latents(model, *posterior(model, state.full_params(), batch), rng, latent_mode)

    def loss_fn(trainable):
        score, _ = model.apply({"params": state.full_params(trainable)}, images, z, embeddings,
                               method="from_latents")
        score = score.astype(jnp.float32)
        mse = jnp.mean((score - target) ** 2)
        rank = ranking_loss(score, target) if rank_weight else jnp.zeros((), jnp.float32)
        return mse + rank_weight * rank, {"mse": mse, "rank_loss": rank}

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return state, step_metrics(loss, parts, grads, params)


def step_metrics(loss: jax.Array, parts: dict, grads, params) -> dict:
    """A train step's metrics: the loss and its parts, the norms of the gradient and of the updated
    params, and whether loss and gradient are finite (the loop stops the run on a NaN)."""
    grad_norm = optax.tree.norm(grads)
    return {"loss": loss, **parts, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
            "is_finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}


def eval_step(params, batch: dict, embeddings: jax.Array, rng: jax.Array, *, model: DPIQA,
              latent_mode: str = "mean") -> dict:
    """Scores of a (padded) eval batch, returned with its targets, indices and mask."""
    z = latents(model, *encode(model, params, batch["image"]), rng, latent_mode)  # never cached
    score, _ = model.apply({"params": params}, batch["image"], z, embeddings, method="from_latents")
    return {"score": score.astype(jnp.float32), "target": batch["target"], "index": batch["index"],
            "mask": batch["mask"]}


def compile_train_step(model: DPIQA, tx: optax.GradientTransformation, mesh: Mesh, shardings: TrainState, *,
                       latent_mode: str, rank_weight: float):
    """The train step jitted over `mesh`: the state in its (FSDP) shardings and donated, the batch
    split over every device, the embeddings and the returned metrics replicated."""
    repl = mesh_lib.replicated(mesh)
    step = functools.partial(train_step, model=model, tx=tx, latent_mode=latent_mode, rank_weight=rank_weight)
    return jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh), repl),
                   out_shardings=(shardings, repl), donate_argnums=(0,))


def compile_eval_step(model: DPIQA, mesh: Mesh, param_shardings, *, latent_mode: str):
    """The eval step jitted over `mesh`; outputs are replicated, so every process holds every score."""
    repl = mesh_lib.replicated(mesh)
    step = functools.partial(eval_step, model=model, latent_mode=latent_mode)
    return jax.jit(step, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh), repl, repl),
                   out_shardings=repl)
