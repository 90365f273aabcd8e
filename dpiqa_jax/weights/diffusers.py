"""Load the U-Net and the VAE encoder from a local diffusers Stable Diffusion folder, without torch.

The folder is what `StableDiffusionPipeline.save_pretrained` writes (e.g. SD-1.5): `unet/` and
`vae/`, each with `config.json` and `diffusion_pytorch_model.safetensors` (or the `.fp16`
variant). The weight files are memory-mapped (`torch_files.read_tensors`) and their tensors
assigned to our params by name (`dpiqa_jax.weights.torch_names`); float16 files are widened to
float32. The VAE's decoder keys are ignored, as are the U-Net's output head (`conv_norm_out`,
`conv_out`).
"""
import json
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from dpiqa_jax.models.vae import VAEConfig, VAEEncoder
from dpiqa_jax.weights.torch_files import read_tensors
from dpiqa_jax.weights.torch_names import WeightsError, load_state_dict

EXPECTED = ("a diffusers SD-1.5 folder with unet/ and vae/, each holding config.json and "
            "diffusion_pytorch_model.safetensors")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def read_json(path: Path, expected: str) -> dict:
    """A config.json as a dict; one-line errors name the file and what the folder should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {expected}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: holds a JSON {type(config).__name__}, not an object")
    return config


def _folder(path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {EXPECTED}")
    return folder


def _config(folder: Path, name: str, from_diffusers):
    """`folder/name/config.json` as our config; errors name the file."""
    config_path = folder / name / "config.json"
    try:
        return from_diffusers(read_json(config_path, EXPECTED))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: {e}") from None


def sd_configs(path) -> tuple:
    """(UNetConfig, VAEConfig) of a local diffusers SD folder, from its config files alone."""
    from dpiqa_jax.models.unet import UNetConfig

    folder = _folder(path)
    return (_config(folder, "unet", UNetConfig.from_diffusers),
            _config(folder, "vae", VAEConfig.from_diffusers))


def _weights(folder: Path, name: str) -> tuple[dict, str]:
    for file in WEIGHT_FILES:
        if (folder / name / file).is_file():
            return read_tensors(str(folder / name / file)), str(folder / name / file)
    raise FileNotFoundError(f"{folder / name}: no {' or '.join(WEIGHT_FILES)}: expected {EXPECTED}")


def load_sd_folder(path, shapes: Optional[dict] = None):
    """-> (UNetConfig, U-Net params, VAEConfig, VAE-encoder params): float32 numpy arrays for
    `UNetFeatures(unet_config)` and `VAEEncoder(vae_config)` (whatever their compute dtype).
    `shapes` ({'unet': ..., 'vae': ...}: the two models' params, or their ShapeDtypeStructs, for
    the folder's configs) saves tracing the two models for their shapes."""
    from dpiqa_jax.models.unet import UNetFeatures

    folder = _folder(path)
    unet_config, vae_config = sd_configs(folder)
    if shapes is None:
        factor = 2 ** (len(unet_config.block_out_channels) - 1)
        latents = jax.ShapeDtypeStruct((1, factor, factor, unet_config.in_channels), jnp.float32)
        context = jax.ShapeDtypeStruct((1, 1, unet_config.cross_attention_dim), jnp.float32)
        side = 2 ** (len(vae_config.block_out_channels) - 1)
        images = jax.ShapeDtypeStruct((1, side, side, vae_config.in_channels), jnp.float32)
        key = jax.random.PRNGKey(0)
        shapes = {"unet": jax.eval_shape(UNetFeatures(unet_config).init, key, latents, 1, context)["params"],
                  "vae": jax.eval_shape(VAEEncoder(vae_config).init, key, images)["params"]}
    params = {}
    for name in ("unet", "vae"):
        state, source = _weights(folder, name)
        params[name] = load_state_dict(shapes[name], state, source=source)
    return unet_config, params["unet"], vae_config, params["vae"]
