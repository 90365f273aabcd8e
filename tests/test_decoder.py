"""Parity of the quality feature decoder and its bicubic resize with PyTorch (tests/torch_reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import TINY_UNET, TINY_VAE
from oracle import flax_params, nchw, nhwc, randomize_, rel_err
from torch_reference import TorchQFD, build_torch_dpiqa, tiny_qfd_kwargs

from dpiqa_jax.models.decoder import QualityFeatureDecoder, bicubic_resize
from dpiqa_jax.weights.torch_names import to_state_dict

TOL = 1e-4
UNUSED = ("bnc1.", "classifier_dist.")


@pytest.mark.parametrize("hw_in,hw_out", [((4, 4), (16, 16)), ((16, 16), (64, 64)), ((5, 5), (12, 12)),
                                          ((1, 1), (8, 8)), ((2, 2), (8, 8)), ((16, 16), (5, 5)),
                                          ((12, 12), (8, 8)), ((6, 9), (8, 4)), ((3, 7), (10, 10))])
def test_bicubic_resize_matches_torch(hw_in, hw_out):
    x = torch.randn(2, 3, *hw_in)
    expected = torch.nn.functional.interpolate(x, size=hw_out, mode="bicubic", align_corners=False).numpy()
    actual = nchw(bicubic_resize(jnp.asarray(nhwc(x.numpy())), hw_out))
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) < 1e-5


def test_bicubic_resize_identity():
    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
    assert bicubic_resize(x, (5, 6)) is x


IN_CHANNELS = (8, 12, 16, 16)
SIZES = (12, 4, 2, 1)  # the map is 8x8: one feature is downsampled, three upsampled


def _tiny_pair():
    ref = randomize_(TorchQFD(in_channels=IN_CHANNELS, map_size=8, **tiny_qfd_kwargs()))
    ours = QualityFeatureDecoder(map_size=8, **tiny_qfd_kwargs())
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(2, c, s, s, generator=gen) for c, s in zip(IN_CHANNELS, SIZES, strict=True)]
    return ref, ours, features


def test_qfd_parity():
    ref, ours, features = _tiny_pair()
    with torch.no_grad():
        score, feature_map = (t.numpy() for t in ref(features))
    inputs = [jnp.asarray(nhwc(f.numpy())) for f in features]
    params = flax_params(ours, ref, inputs)
    our_score, our_map = ours.apply({"params": params}, inputs)
    assert our_score.shape == (2,) and our_map.shape == (2, 8, 8, 8)
    assert rel_err(nchw(our_map), feature_map) < TOL
    assert rel_err(our_score, score[:, 0]) < TOL


def test_qfd_keys_are_the_authors_minus_unused_heads():
    ref, ours, features = _tiny_pair()
    inputs = [jnp.asarray(nhwc(f.numpy())) for f in features]
    shapes = jax.eval_shape(ours.init, jax.random.PRNGKey(0), inputs)["params"]
    ours_keys = set(to_state_dict(shapes, convert=lambda s: np.empty(s.shape, np.uint8)))
    torch_keys = {k for k in ref.state_dict() if not k.startswith(UNUSED)}
    assert ours_keys == torch_keys


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_qfd_param_count_at_spec_defaults():
    sizes = ((320, 64), (640, 64), (1280, 32), (1280, 16))
    inputs = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for c, s in sizes]
    shapes = jax.eval_shape(QualityFeatureDecoder().init, jax.random.PRNGKey(0), inputs)
    with torch.device("meta"):
        ref = TorchQFD()
    expected = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith(UNUSED))
    assert _count(shapes["params"]) == expected


def test_torch_reference_teacher_runs():
    model = randomize_(build_torch_dpiqa(TINY_UNET, TINY_VAE, tiny_qfd_kwargs()))
    x, prompts = torch.rand(2, 3, 64, 64), torch.randn(5, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        score, feature_map = model(x, prompts)
        again, _ = model(x, prompts)
        drawn, _ = model(x, prompts, latent="sample", generator=torch.Generator().manual_seed(0))
    assert score.shape == (2, 1) and feature_map.shape == (2, 8, 8, 8)
    assert torch.equal(score, again) and not torch.equal(score, drawn)
    keys = model.state_dict().keys()
    expected_prefixes = ("vae.", "unet.", "img_adapter.body.3.", "text_adapter.fc.2.", "QFD.bnc1.",
                         "QFD.classifier_dist.")
    for prefix in expected_prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "gamma" in keys
