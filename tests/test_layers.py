"""Parity of the shared blocks with diffusers' PyTorch modules."""
import jax.numpy as jnp
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from oracle import flax_params, nchw, nhwc, randomize_, rel_err

from dpiqa_jax.models.attention import Attention
from dpiqa_jax.models.layers import ResnetBlock2D

TOL = 1e-4


@pytest.mark.parametrize("c_in,c_out,temb", [(8, 8, True), (8, 16, True), (16, 8, False)])
def test_resnet_block(c_in, c_out, temb):
    ref = randomize_(TorchResnet(in_channels=c_in, out_channels=c_out, temb_channels=12 if temb else None,
                                 groups=4, eps=1e-5))
    x = torch.randn(2, c_in, 6, 6)
    t = torch.randn(2, 12) if temb else None
    with torch.no_grad():
        expected = ref(x, t).numpy()
    ours = ResnetBlock2D(c_out, groups=4, eps=1e-5)
    args = (jnp.asarray(nhwc(x.numpy())), None if t is None else jnp.asarray(t.numpy()))
    params = flax_params(ours, ref, *args)
    actual = ours.apply({"params": params}, *args)
    assert rel_err(nchw(actual), expected) < TOL


def test_cross_attention_shared_context():
    ref = randomize_(TorchAttention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8))
    x, ctx = torch.randn(3, 10, 16), torch.randn(1, 7, 12)
    with torch.no_grad():
        expected = ref(x, ctx.expand(3, -1, -1)).numpy()
    ours = Attention(heads=2, dim_head=8)
    params = flax_params(ours, ref, jnp.asarray(x.numpy()), jnp.asarray(ctx.numpy()))
    actual = ours.apply({"params": params}, jnp.asarray(x.numpy()), jnp.asarray(ctx.numpy()))
    assert actual.shape == (3, 10, 16)
    assert rel_err(actual, expected) < TOL


def test_vae_style_attention_with_group_norm():
    ref = TorchAttention(query_dim=16, heads=1, dim_head=16, bias=True, norm_num_groups=4,
                         residual_connection=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    ref = randomize_(ref)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = ref(x).numpy()
    ours = Attention(heads=1, dim_head=16, qkv_bias=True, norm_groups=4)
    params = flax_params(ours, ref, jnp.asarray(nhwc(x.numpy())))
    actual = ours.apply({"params": params}, jnp.asarray(nhwc(x.numpy())))
    assert rel_err(nchw(actual), expected) < TOL
