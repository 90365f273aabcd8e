"""DP-IQA's quality prompts and their CLIP embedding matrix E (1485 x projection_dim).

E is computed once, offline, from a local CLIP folder (`embed_prompts`), or read from a file:
ours (.npy), a safetensors file of one tensor, or the authors' `quality_embeddings.pth`.
"""
import itertools
from pathlib import Path

import jax
import numpy as np

from dpiqa_jax.errors import UserError
from dpiqa_jax.weights import torch_files

QUALITIES = ["bad", "poor", "fair", "good", "perfect"]
SCENES = ["animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others"]
DISTORTIONS = [
    "jpeg2000 compression", "jpeg compression", "white noise", "gaussian blur", "fastfading", "fnoise",
    "contrast", "lens", "motion", "diffusion", "shifting", "color quantization", "oversaturation",
    "desaturation", "white with color", "impulse", "multiplicative", "white noise with denoise", "brighten",
    "darken", "shifting the mean", "jitter", "noneccentricity patch", "pixelate", "quantization",
    "color blocking", "sharpness", "realistic blur", "realistic noise", "underexposure", "overexposure",
    "realistic contrast change", "other realistic",
]
MAX_TOKENS = 77


def prompt_texts() -> list[str]:
    """The 5 x 9 x 33 = 1485 prompts: quality outermost, then scene, then distortion."""
    return [f"a photo of a {scene} with {distortion} artifacts, which is of {quality} quality"
            for quality, scene, distortion in itertools.product(QUALITIES, SCENES, DISTORTIONS)]


def embed_prompts(clip_dir, batch_size: int = 64) -> np.ndarray:
    """CLIP's projected text features (`get_text_features`, not normalised) of `prompt_texts()`."""
    from dpiqa_jax.models.clip_text import CLIPTextWithProjection
    from dpiqa_jax.weights.clip import load_clip_folder

    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    config, params, tokenizer = load_clip_folder(clip_dir)
    tokens = tokenizer(prompt_texts(), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                       return_tensors="np")
    ids, mask = tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
    apply = jax.jit(CLIPTextWithProjection(config).apply)
    variables = {"params": jax.device_put(params)}  # moved to the device once, not per batch
    n = len(ids)
    batch_size = min(batch_size, n)
    pad = -n % batch_size  # pad the last batch (with copies) so that one compiled shape serves all
    ids, mask = np.concatenate([ids, ids[:pad]]), np.concatenate([mask, mask[:pad]])
    starts = range(0, n + pad, batch_size)
    out = [apply(variables, ids[i:i + batch_size], mask[i:i + batch_size]) for i in starts]
    return np.concatenate([np.asarray(o) for o in out])[:n].astype(np.float32)


def save_prompt_embeddings(embeddings: np.ndarray, path) -> None:
    """Write E as .npy (the format `load_prompt_embeddings` and the training config read)."""
    path = Path(path)
    if path.suffix != ".npy":
        raise UserError(f"{path}: prompt embeddings are written as .npy; name the file *.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(embeddings, np.float32))


def load_prompt_embeddings(path) -> np.ndarray:
    """E from .npy, a one-tensor .safetensors, or a torch.save'd tensor (.pth/.pt), as float32."""
    path = str(path)
    if not path.endswith((".npy", ".safetensors", *torch_files.PICKLE_SUFFIXES)):
        raise UserError(f"{path}: unknown prompt-embedding format (use .npy, .safetensors or .pth)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such prompt-embedding file")
    try:
        embeddings = torch_files.read_array(path)
    except (ValueError, OSError) as e:  # np.load's complaints about a file that is not .npy
        raise UserError(f"{path}: not a readable prompt-embedding file ({e})") from None
    if embeddings.ndim != 2:
        raise UserError(f"{path}: expected one 2-D tensor (prompts x dim), found shape {embeddings.shape}")
    return embeddings.astype(np.float32)
