"""The whole teacher against the PyTorch rendering of the authors' model (tests/torch_reference.py)."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import TINY_UNET, TINY_VAE
from oracle import nchw, randomize_, rel_err, state_numpy
from torch_reference import build_torch_dpiqa, tiny_qfd_kwargs

from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
from dpiqa_jax.models.unet import SD15 as UNET_SD15
from dpiqa_jax.teacher import param_shapes, teacher_config_from_dict, teacher_config_to_dict
from dpiqa_jax.weights.torch_names import WeightsError, load_state_dict, to_state_dict

TOL = 1e-4
# Keys of the authors' state dict that the forward pass never reads.
UNUSED = ("vae.decoder.", "vae.post_quant_conv.", "unet.conv_norm_out.", "unet.conv_out.", "QFD.bnc1.",
          "QFD.classifier_dist.")
TINY = {"unet": TINY_UNET, "vae": TINY_VAE, "latent_size": 8, "decoder": tiny_qfd_kwargs()}


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    ref = randomize_(build_torch_dpiqa(TINY_UNET, TINY_VAE, tiny_qfd_kwargs()), seed=seed)
    cfg = teacher_config_from_dict(TINY)
    return ref, cfg, load_state_dict(param_shapes(cfg), state_numpy(ref))


def run_pair(ref, cfg, params, images, prompts, dtype=jnp.float32):
    with torch.no_grad():
        score, fmap = ref(torch.as_tensor(images).permute(0, 3, 1, 2), torch.as_tensor(prompts))
    ours = DPIQA(cfg, dtype=dtype).apply({"params": params}, jnp.asarray(images), jnp.asarray(prompts))
    return (score[:, 0].numpy(), fmap.numpy()), ours


def test_tiny_teacher_matches_authors_model():
    ref, cfg, params = tiny_pair()
    rng = np.random.default_rng(0)
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    prompts = rng.standard_normal((7, 32), dtype=np.float32)
    (score, fmap), (our_score, our_map) = run_pair(ref, cfg, params, images, prompts)
    assert our_score.shape == (2,) and our_map.shape == (2, 8, 8, 8)
    assert rel_err(our_score, score) < TOL
    assert rel_err(nchw(our_map), fmap) < TOL


def test_bfloat16_compute_stays_close_to_float32():
    _, cfg, params = tiny_pair(seed=1)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.random((2, 64, 64, 3), dtype=np.float32))
    prompts = jnp.asarray(rng.standard_normal((7, 32), dtype=np.float32))
    full = DPIQA(cfg).apply({"params": params}, images, prompts)
    half = DPIQA(cfg, dtype=jnp.bfloat16).apply({"params": params}, images, prompts)
    assert half[1].dtype == jnp.bfloat16
    assert rel_err(half[1].astype(jnp.float32), full[1]) < 5e-2


@pytest.mark.parametrize("remat", ["matmuls", "full"])
def test_remat_computes_the_same_outputs_and_gradients(remat):
    _, cfg, params = tiny_pair(seed=2)
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.random((2, 64, 64, 3), dtype=np.float32))
    prompts = jnp.asarray(rng.standard_normal((7, 32), dtype=np.float32))

    def grads(remat):
        def loss(p):
            score, fmap = DPIQA(cfg, remat=remat).apply({"params": p}, images, prompts)
            return jnp.sum(score) + jnp.mean(fmap**2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (plain_loss, plain), (remat_loss, remat) = grads("off"), grads(remat)
    assert jax.tree.structure(remat) == jax.tree.structure(plain)  # the same parameter names
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    assert rel_err(jnp.concatenate([g.ravel() for g in jax.tree.leaves(remat)]),
                   jnp.concatenate([g.ravel() for g in jax.tree.leaves(plain)])) < 1e-5


def test_each_remat_keeps_what_it_says_for_the_backward_pass():
    """What the U-Net's resnets and transformers keep (the jaxpr's saved residuals): with 'off' the
    softmax, GELU and norm intermediates too; with 'matmuls' the convolutions' and dense layers'
    outputs and none of those; with 'full' only each layer's input (the previous one's output)."""
    from jax._src.ad_checkpoint import saved_residuals

    _, cfg, params = tiny_pair(seed=2)
    images, latents, prompts = jnp.zeros((2, 64, 64, 3)), jnp.zeros((2, 8, 8, 4)), jnp.zeros((7, 32))
    layers = ("(ResnetBlock2D.", "(Transformer2D.", "(TransformerBlock.", "(Attention.")

    def kept(remat):
        def loss(p):
            model = DPIQA(cfg, remat=remat)
            return jnp.sum(model.apply({"params": p}, images, latents, prompts, method="from_latents")[0])
        residuals = saved_residuals(loss, params)
        made_by = {why.split("output of ")[1].split()[0] for _, why in residuals
                   if "output of " in why and any(layer in why for layer in layers)}
        return sum(aval.size for aval, why in residuals if "from the argument" not in why), made_by

    (off, off_kinds), (matmuls, matmul_kinds), (full, full_kinds) = map(kept, ("off", "matmuls", "full"))
    assert full < matmuls < off
    recomputed = {"exp", "erfc", "rsqrt"}  # softmax, exact GELU, the norms
    assert recomputed <= off_kinds and not recomputed & (matmul_kinds | full_kinds)
    assert {"dot_general", "conv_general_dilated"} <= matmul_kinds
    assert not {"dot_general", "conv_general_dilated"} & full_kinds, full_kinds


def test_sample_mode_draws_around_the_mean():
    _, cfg, params = tiny_pair()
    images = jnp.asarray(np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32))
    prompts = jnp.ones((3, 32))
    score = jax.jit(lambda *key: DPIQA(cfg).apply({"params": params}, images, prompts, *key)[0])
    mean = score()
    draws = [score(jax.random.PRNGKey(i)) for i in range(2)]
    assert not np.allclose(draws[0], draws[1])
    again = score(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(again, draws[0])
    assert not np.allclose(mean, draws[0])


def test_config_round_trips_through_dict():
    cfg = teacher_config_from_dict(TINY)
    assert teacher_config_from_dict(teacher_config_to_dict(cfg)) == cfg
    assert teacher_config_from_dict({}) == TeacherConfig()


def test_loader_names_every_missing_and_misshaped_key():
    ref, cfg, _ = tiny_pair()
    state = state_numpy(ref)
    del state["QFD.fc3.bias"], state["gamma"]
    state["unet.conv_in.weight"] = state["unet.conv_in.weight"][:, :2]
    with pytest.raises(WeightsError) as e:
        load_state_dict(param_shapes(cfg), state, source="bad.pth")
    message = str(e.value)
    assert "bad.pth" in message and "\n" not in message
    assert "QFD.fc3.bias" in message and "gamma" in message
    assert "unet.conv_in.weight (file (32, 2, 3, 3), model (32, 4, 3, 3))" in message


def test_parameter_counts_at_sd15_equal_the_authors():
    counts = {k: sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(t))
              for k, t in param_shapes(TeacherConfig()).items()}
    # diffusers' SD-1.5 U-Net has 859,520,964 parameters; the unused conv_norm_out/conv_out hold 12,164.
    assert counts["unet"] == 859_520_964 - 12_164
    assert counts["img_adapter"] == 77_369_280
    assert counts["text_adapter"] + counts["gamma"] == 1_181_952
    assert counts["QFD"] == 42_934_697
    # AutoencoderKL's encoder (34,163,592) + quant_conv (72); the decoder is never used.
    assert counts["vae"] == 34_163_664


@pytest.mark.slow
@pytest.mark.xdist_group("memory")
def test_full_size_teacher_matches_authors_model(capsys):
    """SD-1.5 shapes, 512 px, 1485 prompts, random weights: the whole teacher, fp32."""
    vae_config = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    unet_config = {k: getattr(UNET_SD15, k) for k in ("block_out_channels", "layers_per_block",
                                                      "cross_attention_dim", "attention_head_dim")}
    torch.manual_seed(0)
    ref = randomize_(build_torch_dpiqa({**unet_config, "sample_size": 64}, vae_config, {}), seed=0)
    rng = np.random.default_rng(0)
    images = rng.random((1, 512, 512, 3), dtype=np.float32)
    prompts = rng.standard_normal((1485, 768), dtype=np.float32)
    with torch.no_grad():
        score, fmap = ref(torch.as_tensor(images).permute(0, 3, 1, 2), torch.as_tensor(prompts))
    cfg = TeacherConfig()
    params = jax.tree_util.tree_map(jnp.asarray, load_state_dict(param_shapes(cfg), state_numpy(ref)))
    del ref
    forward = jax.jit(lambda p, x, e: DPIQA(cfg).apply({"params": p}, x, e))
    start = time.perf_counter()  # one call (a second, timed alone, would cost 40 s more on 2 cores)
    our_score, our_map = jax.block_until_ready(forward(params, images, prompts))
    with capsys.disabled():
        print(f"\nfull-size teacher forward with its compile: {time.perf_counter() - start:.1f} s; "
              f"score rel err {rel_err(our_score, score[:, 0].numpy()):.2e}, "
              f"map rel err {rel_err(nchw(our_map), fmap.numpy()):.2e}")
    assert rel_err(our_score, score[:, 0].numpy()) < TOL
    assert rel_err(nchw(our_map), fmap.numpy()) < TOL


def test_state_dict_round_trip_is_exact():
    ref, cfg, params = tiny_pair()
    state = to_state_dict(params)
    assert set(state) == set(state_numpy(ref)) - {k for k in state_numpy(ref) if k.startswith(UNUSED)}
    again = load_state_dict(param_shapes(cfg), state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_init_from_a_local_sd_folder_takes_its_unet_and_vae(tmp_path):
    """`model.sd_dir`: the U-Net and VAE are the folder's (as `load_sd_folder` reads it alone),
    every other part the random init's, value for value, though that init is compiled without the
    U-Net's and VAE's; a folder of another model is one error, before any load."""
    from fixtures import write_tiny_sd_folder

    from dpiqa_jax import teacher
    from dpiqa_jax.errors import UserError
    from dpiqa_jax.weights.diffusers import load_sd_folder

    cfg = teacher_config_from_dict(TINY)
    folder = write_tiny_sd_folder(tmp_path / "sd", seed=3)
    params = teacher.init_teacher_params(cfg, seed=5, sd_dir=str(folder))
    _, unet, _, vae = load_sd_folder(folder)
    expected = {**teacher.init_teacher_params(cfg, seed=5), "unet": unet, "vae": vae}
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    other = write_tiny_sd_folder(tmp_path / "other", unet_config={**TINY_UNET, "cross_attention_dim": 16})
    with pytest.raises(UserError, match=f"{other}: its U-Net/VAE configs differ from the teacher config"):
        teacher.init_teacher_params(cfg, seed=0, sd_dir=str(other))
