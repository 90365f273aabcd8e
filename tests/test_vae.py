"""The VAE encoder against diffusers' AutoencoderKL, and the latents drawn from its posterior."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from fixtures import TINY_UNET, TINY_VAE, write_tiny_sd_folder
from oracle import flax_params, nchw, nhwc, randomize_, rel_err
from safetensors.numpy import load_file

from dpiqa_jax.models.vae import SD15, VAEConfig, VAEEncoder, latents_from_posterior
from dpiqa_jax.weights.diffusers import load_sd_folder
from dpiqa_jax.weights.torch_names import WeightsError, to_state_dict

TOL = 1e-4
SD15_VAE_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4)


def _encode_both(vae_config: dict, dtype=jnp.float32):
    torch.manual_seed(0)
    ref = randomize_(AutoencoderKL(**vae_config))
    x = torch.rand(2, 3, 32, 32)  # [0, 1], fed unchanged as DP-IQA does
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    ours = VAEEncoder(VAEConfig.from_diffusers(vae_config), dtype=dtype)
    images = jnp.asarray(nhwc(x.numpy()))
    params = flax_params(ours, ref, images)
    mean, std = jax.jit(ours.apply)({"params": params}, images)
    return (mean, std), (dist.mean.numpy(), dist.std.numpy())


@pytest.mark.parametrize("overrides", [{}, {"use_quant_conv": False, "mid_block_add_attention": False}])
def test_posterior_matches_diffusers(overrides):
    (mean, std), (ref_mean, ref_std) = _encode_both({**TINY_VAE, **overrides})
    assert mean.shape == std.shape == (2, 4, 4, 4)
    assert rel_err(nchw(mean), ref_mean) < TOL
    assert rel_err(nchw(std), ref_std) < TOL


def test_bfloat16_compute_stays_close():
    (mean, std), (ref_mean, _) = _encode_both(TINY_VAE, dtype=jnp.bfloat16)
    assert mean.dtype == std.dtype == jnp.float32
    assert rel_err(nchw(mean), ref_mean) < 5e-2


def test_latents_mean_mode_and_sample_statistics():
    gen = np.random.default_rng(0)
    mean = jnp.asarray(gen.standard_normal((4, 32, 32, 4)), jnp.float32)
    std = jnp.asarray(np.exp(0.3 * gen.standard_normal(mean.shape)), jnp.float32)
    key_draw = jax.random.PRNGKey(0)
    s = SD15.scaling_factor
    np.testing.assert_allclose(latents_from_posterior(mean, std, s), mean * s, rtol=1e-6)
    draw = latents_from_posterior(mean, std, s, key_draw)
    z = np.asarray((draw / s - mean) / std)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    np.testing.assert_array_equal(draw, latents_from_posterior(mean, std, s, key_draw))
    assert not np.allclose(draw, latents_from_posterior(mean, std, s, jax.random.PRNGKey(1)))


def test_sd15_config_and_parameter_layout():
    assert VAEConfig.from_diffusers(SD15_VAE_CONFIG) == SD15
    shapes = jax.eval_shape(VAEEncoder(SD15).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    layout = to_state_dict(shapes, convert=lambda s: np.empty(s.shape, np.uint8))  # torch names and shapes
    ours = {k: v.shape for k, v in layout.items()}
    with torch.device("meta"):
        ref = AutoencoderKL(**SD15_VAE_CONFIG)
    encoder = ("encoder.", "quant_conv.")
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith(encoder)}
    assert ours == expected
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in [*ref.encoder.parameters(), *ref.quant_conv.parameters()])
    assert count == 34_163_664  # of AutoencoderKL's 83.65 M, the rest is the decoder


def test_config_rejects_what_the_encoder_cannot_do():
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({**TINY_VAE, "down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        VAEConfig.from_diffusers({**TINY_VAE, "act_fn": "gelu"})


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return write_tiny_sd_folder(tmp_path_factory.mktemp("sd"))


def _assert_loaded(params, weights_file, prefix=""):
    """Every loaded param equals the file's tensor of the same name (float32, torch layout)."""
    stored = load_file(weights_file)
    for key, value in to_state_dict(params, prefix).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, stored[key].astype(np.float32), err_msg=key)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_load_sd_folder(tmp_path, sd_folder, variant):
    from dpiqa_jax.models.unet import UNetConfig

    folder = write_tiny_sd_folder(tmp_path / "sd", variant=variant) if variant else sd_folder
    unet_config, unet_params, vae_config, vae_params = load_sd_folder(folder)
    assert vae_config == VAEConfig.from_diffusers(TINY_VAE)
    assert unet_config == UNetConfig.from_diffusers(json.loads((folder / "unet/config.json").read_text()))
    assert unet_config.cross_attention_dim == TINY_UNET["cross_attention_dim"]
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    _assert_loaded(unet_params, folder / "unet" / name)
    _assert_loaded(vae_params, folder / "vae" / name)
    assert set(vae_params) == {"encoder", "quant_conv"}


def test_load_sd_folder_does_not_import_torch(sd_folder):
    code = ("import sys; from dpiqa_jax.weights.diffusers import load_sd_folder; "
            f"load_sd_folder({str(sd_folder)!r}); assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_load_sd_folder_errors(tmp_path, sd_folder):
    with pytest.raises(FileNotFoundError, match="unet/ and vae/"):
        load_sd_folder(tmp_path / "nowhere")
    folder = shutil.copytree(sd_folder, tmp_path / "sd")
    config_path = folder / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "act_fn": "gelu"}))
    with pytest.raises(WeightsError, match=r"vae/config.json: VAE config: act_fn='gelu'"):
        load_sd_folder(folder)
    config_path.unlink()
    with pytest.raises(FileNotFoundError, match="vae/config.json not found"):
        load_sd_folder(folder)
    shutil.copy(sd_folder / "vae" / "config.json", config_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unet: no diffusion_pytorch_model.safetensors"):
        load_sd_folder(folder)
