"""Building, initialising and loading the DP-IQA teacher.

A checkpoint may be the authors' `.pth` state dict (with their prompt-embedding file) or one
of our training workdirs / orbax checkpoint folders.
"""
import dataclasses
import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax import checkpoints
from dpiqa_jax.errors import UserError
from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
from dpiqa_jax.models.init import init_key, init_without
from dpiqa_jax.models.unet import UNetConfig
from dpiqa_jax.models.vae import VAEConfig
from dpiqa_jax.weights import torch_files
from dpiqa_jax.weights.torch_names import load_state_dict

PROMPT_FILE_NAMES = ("quality_embeddings.pth", "quality_embeddings.npy", "prompt_embeddings.npy")


def teacher_config_from_dict(d: dict) -> TeacherConfig:
    """{'unet': diffusers unet config, 'vae': diffusers vae config, 'latent_size', 'decoder': {...}}."""
    return TeacherConfig(
        unet=UNetConfig.from_diffusers(d["unet"]) if "unet" in d else TeacherConfig.unet,
        vae=VAEConfig.from_diffusers(d["vae"]) if "vae" in d else TeacherConfig.vae,
        latent_size=int(d.get("latent_size", TeacherConfig.latent_size)),
        adapter_res_blocks=int(d.get("adapter_res_blocks", TeacherConfig.adapter_res_blocks)),
        decoder=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)  # hashable, as JSON gives lists
                             for k, v in dict(d.get("decoder", {})).items())),
    )


def teacher_config_to_dict(cfg: TeacherConfig) -> dict:
    return {"unet": dataclasses.asdict(cfg.unet), "vae": dataclasses.asdict(cfg.vae),
            "latent_size": cfg.latent_size, "adapter_res_blocks": cfg.adapter_res_blocks,
            "decoder": dict(cfg.decoder)}


def read_teacher_config(path: str) -> TeacherConfig:
    try:
        with open(path) as f:
            return teacher_config_from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable teacher config ({e})") from e


@functools.lru_cache(maxsize=None)
def _jitted_init(cfg: TeacherConfig):
    """One jitted init per config: `param_shapes` and then `init_teacher_params` share its trace
    (tracing the U-Net costs seconds at the demo's size and more at SD-1.5's)."""
    return jax.jit(DPIQA(cfg).init)


def _init_inputs(cfg: TeacherConfig) -> tuple:
    return (jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, cfg.embed_dim), jnp.float32))


def param_shapes(cfg: TeacherConfig):
    """The teacher's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    key = jax.eval_shape(init_key)
    return jax.eval_shape(_jitted_init(cfg), key, *_init_inputs(cfg))["params"]


def init_teacher_params(cfg: TeacherConfig, seed: int, sd_dir: Optional[str] = None):
    """Random init; with `sd_dir` the VAE and U-Net come from a local diffusers SD-1.5 folder
    (the other parts' values are the random init's all the same)."""
    zeros = [jnp.zeros(x.shape, x.dtype) for x in _init_inputs(cfg)]
    if sd_dir is None:
        return _jitted_init(cfg)(init_key(seed), *zeros)["params"]
    from dpiqa_jax.weights import diffusers

    if diffusers.sd_configs(sd_dir) != (cfg.unet, cfg.vae):
        raise UserError(f"{sd_dir}: its U-Net/VAE configs differ from the teacher config")
    shapes = param_shapes(cfg)
    _, unet, _, vae = diffusers.load_sd_folder(sd_dir, {"unet": shapes["unet"], "vae": shapes["vae"]})
    # SD-1.5's size, 2 CPU cores: the init compiles in 4 s instead of 27 and runs in 3 s instead of 20
    others = init_without(_jitted_init(cfg), ("unet", "vae"))(init_key(seed), *zeros)["params"]
    return {**others, "unet": unet, "vae": vae}


def demo_prompt_embeddings(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """A fixed random prompt matrix for configs that run without a CLIP model (the demo)."""
    return np.random.default_rng(seed).standard_normal((num, dim)).astype(np.float32)


def find_prompt_file(checkpoint: str) -> str:
    folder = os.path.dirname(os.path.abspath(checkpoint))
    for name in PROMPT_FILE_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"{checkpoint}: the authors' checkpoints need their prompt-embedding file: pass "
                    f"--prompt-embeddings FILE (quality_embeddings.pth) or put it beside the checkpoint")


def load_authors_teacher(path: str, cfg: Optional[TeacherConfig] = None):
    """Params from the authors' teacher state dict (`vae.*`, `unet.*`, `gamma`, ...).
    Keys the forward pass never uses (the VAE decoder, QFD.bnc1, QFD.classifier_dist) are ignored."""
    state = torch_files.read_tensors(path)
    return load_state_dict(param_shapes(cfg or TeacherConfig()), state, source=path)


def load_teacher(checkpoint: str, prompt_embeddings: Optional[str] = None,
                 model_config: Optional[str] = None):
    """(TeacherConfig, params, prompt embeddings) from a teacher state-dict file (the authors' .pth)
    or one of our folders (see `restore_teacher`).

    `model_config` (a JSON written by `teacher_config_to_dict`) describes a file whose shapes are
    not SD-1.5's."""
    from dpiqa_jax.prompts import load_prompt_embeddings

    if os.path.isdir(checkpoint):
        cfg, params, embeddings = restore_teacher(checkpoint)
    else:
        cfg = read_teacher_config(model_config) if model_config else TeacherConfig()
        params = load_authors_teacher(checkpoint, cfg)
        embeddings = load_prompt_embeddings(prompt_embeddings or find_prompt_file(checkpoint))
    if prompt_embeddings is not None:
        embeddings = load_prompt_embeddings(prompt_embeddings)
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != cfg.embed_dim:
        raise UserError(f"prompt embeddings of shape {embeddings.shape} do not fit the teacher "
                        f"(expected (N, {cfg.embed_dim}))")
    return cfg, params, embeddings


def save_teacher(folder: str, cfg: TeacherConfig, params, embeddings) -> None:
    """Our own checkpoint in one folder: orbax params, the config as JSON and the prompt matrix
    (the files of a training workdir, flat)."""
    import orbax.checkpoint as ocp

    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(folder, checkpoints.PARAMS), params)
    checkpointer.wait_until_finished()  # the save is asynchronous
    with open(os.path.join(folder, checkpoints.MODEL_FILE), "w") as f:
        json.dump(teacher_config_to_dict(cfg), f, indent=1)
    np.save(os.path.join(folder, checkpoints.EMBEDDINGS_FILE), np.asarray(embeddings, np.float32))


def restore_teacher(path: str, sharding_fn=None):
    """(TeacherConfig, params, prompt embeddings) from a training workdir (its best-by-SRCC
    checkpoint, else the latest), one of its checkpoint or step folders, or a `save_teacher` folder."""
    run_dir, step_dir = checkpoints.resolve(path)
    cfg = read_teacher_config(os.path.join(run_dir, checkpoints.MODEL_FILE))
    embeddings = np.load(os.path.join(run_dir, checkpoints.EMBEDDINGS_FILE))
    return cfg, checkpoints.restore_item(step_dir, sharding_fn=sharding_fn), embeddings
