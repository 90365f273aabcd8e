"""Load the U-Net and the VAE encoder from a local diffusers Stable Diffusion folder, without torch.

The folder is what `StableDiffusionPipeline.save_pretrained` writes (e.g. SD-1.5): `unet/` and
`vae/`, each with `config.json` and `diffusion_pytorch_model.safetensors` (or the `.fp16`
variant). Weights are read with safetensors' numpy backend and mapped by name
(`dpiqa_jax.weights.torch_names`); float16 files are widened to float32. The VAE's decoder keys
are ignored, as are the U-Net's output head (`conv_norm_out`, `conv_out`).
"""
import json
from pathlib import Path

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


def _component(folder: Path, name: str, from_diffusers):
    """(config, state dict) of `folder/name`; config errors name the file."""
    config_path = folder / name / "config.json"
    config_dict = read_json(config_path, EXPECTED)
    try:
        config = from_diffusers(config_dict)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: {e}") from None
    for file in WEIGHT_FILES:
        if (folder / name / file).is_file():
            return config, read_tensors(str(folder / name / file)), str(folder / name / file)
    raise FileNotFoundError(f"{folder / name}: no {' or '.join(WEIGHT_FILES)}: expected {EXPECTED}")


def _load(module, state, source: str, *example_inputs):
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *example_inputs)["params"]
    return load_state_dict(shapes, state, source=source)


def load_sd_folder(path):
    """-> (UNetConfig, U-Net params, VAEConfig, VAE-encoder params): float32 numpy arrays for
    `UNetFeatures(unet_config)` and `VAEEncoder(vae_config)` (whatever their compute dtype)."""
    from dpiqa_jax.models.unet import UNetConfig, UNetFeatures

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {EXPECTED}")
    unet_config, unet_state, unet_source = _component(folder, "unet", UNetConfig.from_diffusers)
    vae_config, vae_state, vae_source = _component(folder, "vae", VAEConfig.from_diffusers)

    factor = 2 ** (len(unet_config.block_out_channels) - 1)
    latents = jax.ShapeDtypeStruct((1, factor, factor, unet_config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, unet_config.cross_attention_dim), jnp.float32)
    unet_params = _load(UNetFeatures(unet_config), unet_state, unet_source, latents, 1, context)

    side = 2 ** (len(vae_config.block_out_channels) - 1)
    images = jax.ShapeDtypeStruct((1, side, side, vae_config.in_channels), jnp.float32)
    vae_params = _load(VAEEncoder(vae_config), vae_state, vae_source, images)
    return unet_config, unet_params, vae_config, vae_params
