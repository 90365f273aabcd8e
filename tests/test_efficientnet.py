"""The Flax EfficientNet against torchvision's: structure, eval-mode parity, training mode."""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from oracle import nchw, nhwc, randomize_, rel_err, state_numpy

from dpiqa_jax.errors import UserError
from dpiqa_jax.models.efficientnet import (
    EfficientNet,
    MBConv,
    depthwise_grouped,
    depthwise_shifted_sum,
    get_variant,
    stages,
)
from dpiqa_jax.weights.student import load_variables

TOL = 1e-4


def calibrate_batch_norms_(module: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> torch.nn.Module:
    """Random running statistics on every BatchNorm2d, near the statistics it sees on `images`.
    Arbitrary statistics make random-weight activations vanish or explode layer after layer, until
    the output no longer depends on the input and a parity test compares constants. Each norm's
    statistics are set just before it runs, so they fit what its (already calibrated) inputs are.
    Use a dozen images or more: statistics over few samples per channel make the network
    ill-conditioned (float32 rounding amplified past the tolerance)."""
    gen = torch.Generator().manual_seed(seed)

    def calibrate(norm, inputs):
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        noise = torch.randn(mean.shape, generator=gen), torch.rand(var.shape, generator=gen)
        norm.running_mean.copy_(mean + 0.1 * var.sqrt() * noise[0])
        norm.running_var.copy_(var * (0.8 + 0.4 * noise[1]))

    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
    with torch.no_grad():
        module.eval()(images)
    for hook in hooks:
        hook.remove()
    return module


def random_torchvision(variant: str) -> torch.nn.Module:
    """torchvision's efficientnet_{variant}: random weights, statistics calibrated on random images."""
    model = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None)
    return calibrate_batch_norms_(randomize_(model), random_images(16))


def random_images(batch: int = 2, size: int = 64) -> torch.Tensor:
    """The same images for every call: the first two are among the 16 that calibrate the norms."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def float64_output(module: torch.nn.Module, *inputs):
    """The module's exact function of its float32 weights: rounding of float32 arithmetic removed."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(x.double() for x in inputs))


def flax_variables(model, torch_model, x, prefix: str = ""):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return load_variables(shapes, state_numpy(torch_model), prefix=prefix)


@pytest.fixture(scope="module")
def b0():
    return random_torchvision("b0")


def check_eval_parity(variant: str, ref: torch.nn.Module):
    x = random_images()
    with torch.no_grad():
        expected = ref.features(x).numpy()
    assert rel_err(expected[0], expected[1]) > 0.1  # the oracle's output depends on its input
    ours, xj = EfficientNet(variant), jnp.asarray(nhwc(x.numpy()))
    actual = nchw(jax.jit(ours.apply)(flax_variables(ours, ref, xj), xj))
    assert actual.shape == (2, expected.shape[1], 2, 2)
    err = rel_err(actual, expected)
    print(f"efficientnet_{variant} eval rel err {err:.2e}")
    assert err < TOL


def test_b0_eval_parity(b0):
    check_eval_parity("b0", b0)


def test_b7_eval_parity():
    check_eval_parity("b7", random_torchvision("b7"))


def test_float64_equals_torchvision_float64(b0):
    """With rounding out of the way (both sides in float64), any error left would be a bug. B0 only:
    the other variants run the same code, and float64 depthwise convs are slow on the CPU."""
    x = random_images(size=32)
    exact = float64_output(b0.features, x).numpy()
    with jax.enable_x64(True):
        ours = EfficientNet("b0", dtype=jnp.float64)
        xj = jnp.asarray(nhwc(x.double().numpy()))
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), flax_variables(ours, b0, xj))
        err = rel_err(nchw(jax.jit(ours.apply)(variables, xj)), exact)
    print(f"efficientnet_b0 float64 rel err {err:.2e}")
    assert err < 1e-10


@pytest.mark.parametrize("variant", [f"b{i}" for i in range(8)])
def test_variants_follow_torchvision(variant):
    with torch.device("meta"):  # structure only
        ref = getattr(torchvision.models, f"efficientnet_{variant}")()
    ours = stages(variant)
    assert ours[0].in_channels == ref.features[0][0].out_channels
    expected = [(len(stage), stage[0].out_channels) for stage in ref.features[1:-1]]
    assert [(s.blocks, s.out_channels) for s in ours] == expected
    norm, v = ref.features[0][1], get_variant(variant)
    assert (v.bn_eps, v.bn_momentum) == (norm.eps, norm.momentum)


def test_unknown_variant():
    with pytest.raises(UserError, match="b8"):
        EfficientNet("b8").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_training_mode_matches_torch_and_updates_statistics(b0):
    # Stochastic depth off on both sides: the only randomness torch's training forward has.
    ref, x = copy.deepcopy(b0), random_images()
    for m in ref.modules():
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    ours, xj = EfficientNet("b0", stochastic_depth_prob=0.0), jnp.asarray(nhwc(x.numpy()))
    variables = flax_variables(ours, ref, xj)
    with torch.no_grad():
        expected = ref.train().features(x).numpy()
    actual, updates = jax.jit(ours.apply, static_argnames=("train", "mutable"))(
        variables, xj, train=True, mutable=("batch_stats",))
    assert rel_err(nchw(actual), expected) < TOL
    stats = load_variables({"batch_stats": updates["batch_stats"]}, state_numpy(ref))["batch_stats"]
    for new, torch_new, old in zip(jax.tree_util.tree_leaves(updates["batch_stats"]),
                                   jax.tree_util.tree_leaves(stats),
                                   jax.tree_util.tree_leaves(variables["batch_stats"]), strict=True):
        assert not np.allclose(new, old)
        np.testing.assert_allclose(new, torch_new, rtol=1e-4, atol=1e-6)


def random_variables(model, *args, seed: int = 0, **kwargs):
    """Random params and running means, unit running variances, without running `init` (whose
    random initialisers take long to compile on the CPU)."""
    rng = np.random.default_rng(seed)
    fill = lambda path, s: (np.ones(s.shape, s.dtype) if path[-1].key == "var"
                            else (0.3 * rng.standard_normal(s.shape)).astype(s.dtype))
    shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.PRNGKey(0), *args)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_stochastic_depth_drops_whole_residual_branches_in_training_only():
    x = np.random.default_rng(0).standard_normal((16, 4, 4, 8)).astype(np.float32)
    block = lambda p: MBConv(8, 6, 3, 1, p, eps=1e-3, momentum=0.01)
    variables = random_variables(block(0.0), x, train=False)
    # With batch statistics (train=True) the branch h is the same for every drop probability.
    branch = np.asarray(block(0.0).apply(variables, x, train=True, mutable=["batch_stats"])[0] - x)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    dropped = np.asarray(block(0.5).apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0])
    kept = np.array([np.allclose(d, xi + 2 * h, atol=1e-5)
                     for d, xi, h in zip(dropped, x, branch, strict=True)])
    gone = np.array([np.allclose(d, xi, atol=1e-6) for d, xi in zip(dropped, x, strict=True)])
    assert np.all(kept ^ gone) and kept.any() and gone.any()
    # Eval mode: no rng needed, the branch always kept, the statistics read and left unchanged.
    evaluated, state = block(0.5).apply(variables, x, train=False, mutable=["batch_stats"])
    np.testing.assert_allclose(evaluated, block(0.0).apply(variables, x, train=False))
    assert not np.allclose(evaluated, x)
    unchanged = jax.tree.map(np.array_equal, state["batch_stats"], variables["batch_stats"])
    assert jax.tree_util.tree_all(unchanged)


@pytest.mark.parametrize("kernel, stride, size", [(3, 1, 9), (5, 2, 9), (3, 2, 8)])
def test_depthwise_paths_of_cpu_and_other_platforms_agree(kernel, stride, size):
    """On the CPU the depthwise convolution is a sum of shifted slices (XLA:CPU's grouped
    convolution is 50x slower); other platforms lower the grouped convolution. Both here, with
    their gradients, on odd and even sizes and both strides."""
    keys = jax.random.split(jax.random.PRNGKey(kernel * 10 + stride), 3)
    x = jax.random.normal(keys[0], (2, size, size, 6))
    w = jax.random.normal(keys[1], (kernel, kernel, 1, 6))
    pad = (kernel - 1) // 2
    shifted, grouped = (functools.partial(f, stride=stride, pad=pad)
                        for f in (depthwise_shifted_sum, depthwise_grouped))
    cotangent = jax.random.normal(keys[2], grouped(x, w).shape)
    results = [jax.vjp(f, x, w) for f in (shifted, grouped)]
    assert rel_err(results[0][0], results[1][0]) < 1e-6
    for a, b in zip(results[0][1](cotangent), results[1][1](cotangent), strict=True):
        assert rel_err(a, b) < 1e-6
