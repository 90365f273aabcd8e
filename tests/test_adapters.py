"""Parity of the image adapter (diffusers FullAdapter) and the prompt MLP with PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.adapter import FullAdapter
from oracle import flax_params, nchw, nhwc, randomize_, rel_err
from torch_reference import TorchTextAdapter

from dpiqa_jax.models.adapters import ImageAdapter, TextAdapter, avg_pool_ceil, pixel_unshuffle

TOL = 1e-4
TINY_CHANNELS = (8, 16, 32, 32)


def test_pixel_unshuffle_channel_order():
    x = torch.randn(2, 3, 8, 12)
    expected = torch.nn.functional.pixel_unshuffle(x, 4).numpy()
    np.testing.assert_array_equal(nchw(pixel_unshuffle(jnp.asarray(nhwc(x.numpy())), 4)), expected)


def test_pixel_unshuffle_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not a multiple"):
        pixel_unshuffle(jnp.zeros((1, 12, 16, 3)), 8)


@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (5, 3), (1, 1), (3, 1)])
def test_avg_pool_ceil_mode(hw):
    x = torch.randn(2, 4, *hw)
    expected = torch.nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)(x).numpy()
    actual = nchw(avg_pool_ceil(jnp.asarray(nhwc(x.numpy()))))
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-6


@pytest.mark.parametrize("hw", [(64, 64), (72, 56)])
def test_image_adapter_parity(hw):
    ref = randomize_(FullAdapter(in_channels=3, channels=list(TINY_CHANNELS), num_res_blocks=2,
                                 downscale_factor=8))
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        expected = [f.numpy() for f in ref(x)]
    ours = ImageAdapter(channels=TINY_CHANNELS, num_res_blocks=2, downscale_factor=8)
    images = jnp.asarray(nhwc(x.numpy()))
    params = flax_params(ours, ref, images)
    actual = ours.apply({"params": params}, images)
    assert [nchw(a).shape for a in actual] == [e.shape for e in expected]
    errors = [rel_err(nchw(a), e) for a, e in zip(actual, expected, strict=True)]
    assert max(errors) < TOL, errors


def test_text_adapter_parity():
    ref = randomize_(TorchTextAdapter(24))
    e = torch.randn(7, 24)
    with torch.no_grad():
        expected = ref(e).numpy()
    ours = TextAdapter(24)
    params = flax_params(ours, ref, jnp.asarray(e.numpy()))
    assert rel_err(ours.apply({"params": params}, jnp.asarray(e.numpy())), expected) < TOL


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_image_adapter_param_count_at_spec_defaults():
    shapes = jax.eval_shape(ImageAdapter().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 512, 512, 3),
                                                                                               jnp.float32))
    with torch.device("meta"):
        ref = FullAdapter()
    assert _count(shapes["params"]) == sum(p.numel() for p in ref.parameters())


def test_image_adapter_keeps_bfloat16_through_pooling():
    ours = ImageAdapter(channels=TINY_CHANNELS, dtype=jnp.bfloat16)
    images = jnp.ones((1, 72, 56, 3))
    features = ours.apply(ours.init(jax.random.PRNGKey(0), images), images)
    assert [f.dtype for f in features] == [jnp.bfloat16] * 4
