"""Scoring a whole split: every prediction gathered (padding masked out) before the metrics."""
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dpiqa_jax.errors import UserError
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.metrics import iqa_metrics


def predict(eval_step: Callable, params, batches: Iterable[dict], embeddings, key: jax.Array) -> dict:
    """{'score', 'target', 'index'} numpy arrays over the split, sorted by index, padding removed.
    Batch i draws its latents (when sampled) with fold_in(key, i)."""
    outputs = [mesh_lib.host_values(eval_step(params, batch, embeddings, jax.random.fold_in(key, i)))
               for i, batch in enumerate(batches)]
    gathered = {k: np.concatenate([o[k] for o in outputs]) for k in ("score", "target", "index", "mask")}
    keep = gathered.pop("mask").astype(bool)
    predictions = {k: v[keep] for k, v in gathered.items()}
    if len(np.unique(predictions["index"])) != len(predictions["index"]):
        raise RuntimeError("an image was scored twice: the eval batches overlap across processes")
    order = np.argsort(predictions["index"], kind="stable")
    return {k: v[order] for k, v in predictions.items()}


def evaluate(eval_step: Callable, params, batches: Iterable[dict], embeddings, key: jax.Array):
    """(metrics, predictions) of a split."""
    predictions = predict(eval_step, params, batches, embeddings, key)
    return iqa_metrics(predictions["score"], predictions["target"]), predictions


def evaluate_checkpoint(checkpoint: str, dataset: str, *, part: str = "test", split: str = "random",
                        data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                        prompt_embeddings: Optional[str] = None, model_config: Optional[str] = None,
                        batch_size: int = 16, latents: str = "mean", seed: int = 0,
                        dtype: str = "float32") -> tuple[dict, dict]:
    """(metrics, predictions) of any teacher or student checkpoint (see `scorer.load`) on `part`
    ('test', 'train' or 'all' = both) of `dataset` split by `split`, data-parallel over every device."""
    from dpiqa_jax.data import pipeline

    parts = {"test": ("test",), "train": ("train",), "all": ("train", "test")}
    if part not in parts:
        raise UserError(f"split {part!r}: choose one of {', '.join(parts)}")
    mesh = mesh_lib.make_mesh(1)
    mesh_lib.batch_size_per_process(mesh, batch_size, "--batch-size")
    step, params, embeddings, image_size = _eval_model(checkpoint, mesh, prompt_embeddings, model_config,
                                                       latents, jnp.dtype(dtype))
    predictions = []
    for name in parts[part]:
        loaded = pipeline.eval_batches(dataset, split, batch_size=batch_size, part=name,
                                       image_size=image_size, data_dir=data_dir, manual_dir=manual_dir,
                                       image_dtype="uint8")
        shown = tqdm(loaded, total=loaded.count, unit="batch", desc=f"{dataset} {name}", dynamic_ncols=True,
                     disable=jax.process_index() != 0)  # a whole dataset on one device takes a while
        batches = (pipeline.to_global(b, mesh, mesh_lib.BATCH_AXES) for b in shown)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), len(predictions))
        predictions.append(predict(step, params, batches, embeddings, key))
    merged = {k: np.concatenate([p[k] for p in predictions]) for k in predictions[0]}
    return iqa_metrics(merged["score"], merged["target"]), merged


def _eval_model(checkpoint: str, mesh, prompt_embeddings, model_config, latents: str, dtype):
    """(eval step, replicated weights, replicated prompt matrix or None, image size) of a checkpoint."""
    from dpiqa_jax.models.dpiqa import DPIQA
    from dpiqa_jax.scorer import read_checkpoint
    from dpiqa_jax.train.distill import compile_student_eval_step
    from dpiqa_jax.train.state import place
    from dpiqa_jax.train.step import compile_eval_step

    loaded = read_checkpoint(checkpoint, prompt_embeddings, model_config, latent=latents)
    repl = mesh_lib.replicated(mesh)
    weights = place(loaded.weights, jax.tree.map(lambda _: repl, loaded.weights))
    if loaded.is_student:
        step = compile_student_eval_step(loaded.config.model(dtype), mesh, repl)
        return step, weights, None, loaded.image_size
    step = compile_eval_step(DPIQA(loaded.config, dtype=dtype), mesh, repl, latent_mode=latents)
    return step, weights, place(np.asarray(loaded.embeddings, np.float32), repl), loaded.image_size
