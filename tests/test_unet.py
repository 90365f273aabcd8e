"""Parity of the U-Net feature path with diffusers' UNet2DConditionModel (tiny configs)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from oracle import flax_params, nchw, nhwc, randomize_, rel_err

from dpiqa_jax.models.unet import SD15, UNetConfig, UNetFeatures

TOL = 1e-4
TINY = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=2,
            cross_attention_dim=16, layers_per_block=1)
BATCH, SIZE, TOKENS = 2, 16, 5


def _inputs(config: UNetConfig, seed: int = 0):
    """Latents, a batch-1 context and one adapter residual per down block (NCHW, torch)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(BATCH, 4, SIZE, SIZE, generator=gen)
    context = torch.randn(1, TOKENS, config.cross_attention_dim, generator=gen)
    residuals = [torch.randn(BATCH, c, SIZE // 2**i, SIZE // 2**i, generator=gen)
                 for i, c in enumerate(config.block_out_channels)]
    return latents, context, residuals


def _reference_up_outputs(ref, latents, context, residuals):
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out.numpy()))
             for block in ref.up_blocks]
    # diffusers pops the residuals it uses from the list: hand it a copy.
    adapter = None if residuals is None else list(residuals)
    with torch.no_grad():
        ref(latents, 1, context.expand(BATCH, -1, -1), down_intrablock_additional_residuals=adapter)
    for hook in hooks:
        hook.remove()
    return outputs


def _ours(config, ref, latents, context, residuals, timesteps=1, dtype=jnp.float32, jit=False):
    model = UNetFeatures(config, dtype=dtype)
    args = (jnp.asarray(nhwc(latents.numpy())), timesteps, jnp.asarray(context.numpy()),
            None if residuals is None else [jnp.asarray(nhwc(r.numpy())) for r in residuals])
    params = flax_params(model, ref, *args)
    # Eager runs reuse the per-op compilations of earlier tests; a fresh dtype compiles faster as one
    # program at a low XLA optimisation level.
    low_opt = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
    apply = jax.jit(model.apply, compiler_options=low_opt) if jit else model.apply
    return apply({"params": params}, *args)


def _assert_parity(actual, expected, label):
    assert [a.shape for a in actual] == [nhwc(e).shape for e in expected]
    errors = [rel_err(nchw(a), e) for a, e in zip(actual, expected, strict=True)]
    print(f"{label}: up-block rel errors {errors}")
    assert max(errors) < TOL, errors


def test_sd_like_unet_matches_diffusers_with_and_without_adapter():
    ref = randomize_(UNet2DConditionModel(**TINY))
    config = UNetConfig.from_diffusers(dict(ref.config))
    latents, context, residuals = _inputs(config)
    plain = _ours(config, ref, latents, context, None)
    _assert_parity(plain, _reference_up_outputs(ref, latents, context, None), "plain")
    adapted = _ours(config, ref, latents, context, residuals, timesteps=jnp.ones((BATCH,), jnp.int32))
    _assert_parity(adapted, _reference_up_outputs(ref, latents, context, residuals), "adapter")
    assert all(rel_err(a, p) > 1e-3 for a, p in zip(adapted, plain, strict=True))


@pytest.mark.parametrize("overrides", [
    dict(layers_per_block=2),
    dict(use_linear_projection=True),
    dict(attention_head_dim=(1, 2, 2, 4), transformer_layers_per_block=(1, 2, 1, 2)),
])
def test_variants_match_diffusers(overrides):
    ref = randomize_(UNet2DConditionModel(**{**TINY, **overrides}))
    config = UNetConfig.from_diffusers(dict(ref.config))
    latents, context, residuals = _inputs(config)
    actual = _ours(config, ref, latents, context, residuals)
    _assert_parity(actual, _reference_up_outputs(ref, latents, context, residuals), str(overrides))


def test_bfloat16_close_to_float32():
    ref = randomize_(UNet2DConditionModel(**TINY))
    config = UNetConfig.from_diffusers(dict(ref.config))
    latents, context, residuals = _inputs(config)
    full = _ours(config, ref, latents, context, residuals)
    half = _ours(config, ref, latents, context, residuals, dtype=jnp.bfloat16, jit=True)
    assert all(h.dtype == jnp.bfloat16 and bool(jnp.isfinite(h).all()) for h in half)
    errors = [rel_err(np.asarray(h, np.float32), f) for h, f in zip(half, full, strict=True)]
    print("bfloat16 rel errors", errors)
    assert max(errors) < 3e-2, errors


# The unet/config.json of the SD-1.5 release (written by diffusers 0.6).
SD15_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_config_from_diffusers():
    assert UNetConfig.from_diffusers(SD15_JSON) == SD15
    tiny = dict(TINY, use_linear_projection=True, transformer_layers_per_block=(1, 2, 1, 2))
    expected = UNetConfig(**tiny)
    config = dict(UNet2DConditionModel(**tiny).config)
    assert UNetConfig.from_diffusers(config) == expected
    assert UNetConfig.from_diffusers(json.loads(json.dumps(config))) == expected  # json lists -> tuples
    assert UNetConfig.from_diffusers({**config, "num_attention_heads": 4}).heads() == (4, 4, 4, 4)


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text"), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("dual_cross_attention", True),
    ("only_cross_attention", True), ("upcast_attention", True), ("attention_type", "gated"),
    ("center_input_sample", True), ("mid_block_type", "UNetMidBlock2D"), ("layers_per_block", [1, 2, 2, 2]),
    ("some_new_setting", 1),
])
def test_config_rejects_unsupported_settings(key, value):
    config = dict(UNet2DConditionModel(**TINY).config)
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers({**config, key: value})


def test_bad_inputs_raise_clear_errors():
    model = UNetFeatures(UNetConfig(**TINY))
    latents, context = jnp.zeros((1, SIZE, SIZE, 4)), jnp.zeros((1, TOKENS, 16))
    init = lambda *args: jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    with pytest.raises(ValueError, match="latents"):
        init(jnp.zeros((1, 12, 12, 4)), 1, context)
    with pytest.raises(ValueError, match="context"):
        init(latents, 1, jnp.zeros((1, TOKENS, 8)))
    with pytest.raises(ValueError, match="adapter residuals"):
        init(latents, 1, context, [jnp.zeros((1, SIZE, SIZE, 32))])


def test_sd15_parameter_count():
    # diffusers' SD-1.5 UNet has 859,520,964 parameters; conv_norm_out (640) and conv_out (320*4*9+4)
    # are not built.
    expected = 859_520_964 - 640 - (320 * 4 * 9 + 4)
    latents = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
    outputs, shapes = jax.eval_shape(UNetFeatures(SD15).init_with_output, jax.random.PRNGKey(0), latents, 1,
                                     context)
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected
    expected_shapes = [(1, 16, 16, 1280), (1, 32, 32, 1280), (1, 64, 64, 640), (1, 64, 64, 320)]
    assert [o.shape for o in outputs] == expected_shapes
