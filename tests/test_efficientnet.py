"""The Flax EfficientNet against torchvision's: names, eval-mode parity, training mode."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from oracle import nchw, nhwc, randomize_, rel_err, state_numpy

from dpiqa_jax.errors import UserError
from dpiqa_jax.models.efficientnet import EfficientNet, MBConv, get_variant
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

    hooks = [m.register_forward_pre_hook(calibrate) for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        module.eval()(images)
    for hook in hooks:
        hook.remove()
    return module


def random_torchvision(variant: str, **kwargs) -> torch.nn.Module:
    """torchvision's efficientnet_{variant}: random weights, statistics calibrated on random images."""
    model = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None, **kwargs)
    return calibrate_batch_norms_(randomize_(model), random_images(16))


def random_images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def float64_output(module: torch.nn.Module, *inputs):
    """The module's exact function of its float32 weights: rounding of float32 arithmetic removed."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(x.double() for x in inputs))


def flax_variables(model, torch_model, x, prefix: str = ""):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return load_variables(shapes, state_numpy(torch_model), prefix=prefix)


@pytest.mark.parametrize("variant", ["b0", "b7"])
def test_eval_parity_with_torchvision(variant):
    ref, x = random_torchvision(variant), random_images()
    with torch.no_grad():
        expected = ref.features(x).numpy()
    exact = float64_output(ref.features, x).numpy()
    assert rel_err(exact[0], exact[1]) > 0.1  # the oracle's output depends on its input
    ours, xj = EfficientNet(variant), jnp.asarray(nhwc(x.numpy()))
    variables = flax_variables(ours, ref, xj)
    actual = nchw(jax.jit(ours.apply)(variables, xj))
    assert actual.shape == (2, expected.shape[1], 2, 2)
    errors = {"torch fp32": rel_err(actual, expected), "torch fp64": rel_err(actual, exact),
              "torch fp32 vs fp64": rel_err(expected, exact)}
    with jax.enable_x64(True):  # ours in float64 too: any error left is a bug, not rounding
        ours64 = EfficientNet(variant, dtype=jnp.float64)
        x64 = jnp.asarray(nhwc(x.double().numpy()))
        errors["ours fp64 vs torch fp64"] = rel_err(nchw(jax.jit(ours64.apply)(variables, x64)), exact)
    print(f"efficientnet_{variant} eval, ours fp32 vs", ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["torch fp32"] < TOL and errors["torch fp64"] < TOL
    assert errors["ours fp64 vs torch fp64"] < 1e-10


def test_batch_norm_settings_follow_torchvision():
    for variant in ("b0", "b4", "b5", "b7"):
        bn = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None).features[0][1]
        v = get_variant(variant)
        assert (v.bn_eps, v.bn_momentum) == (bn.eps, bn.momentum)
    with pytest.raises(UserError, match="b8"):
        get_variant("b8")


def test_training_mode_matches_torch_and_updates_statistics():
    # Stochastic depth off on both sides: the only randomness torch's training forward has.
    ref, x = random_torchvision("b0", stochastic_depth_prob=0.0), random_images()
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
    # Eval mode reads the statistics and updates nothing.
    _, unchanged = ours.apply(variables, xj, mutable=["batch_stats"])
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, unchanged["batch_stats"],
                                               variables["batch_stats"]))


def test_stochastic_depth_drops_whole_residual_branches_in_training_only():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 8))
    block = lambda p: MBConv(8, 6, 3, 1, p, eps=1e-3, momentum=0.01)
    variables = block(0.0).init(jax.random.PRNGKey(1), x, train=False)
    # With batch statistics (train=True) the branch h is the same for every drop probability.
    branch = block(0.0).apply(variables, x, train=True, mutable=["batch_stats"])[0] - x
    rngs = {"dropout": jax.random.PRNGKey(2)}
    dropped = block(0.5).apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]
    kept = np.array([np.allclose(d, xi + 2 * h, atol=1e-5)
                     for d, xi, h in zip(dropped, x, branch, strict=True)])
    gone = np.array([np.allclose(d, xi, atol=1e-6) for d, xi in zip(dropped, x, strict=True)])
    assert np.all(kept ^ gone) and kept.any() and gone.any()
    # Eval mode: no rng needed, the branch always kept.
    evaluated = block(0.5).apply(variables, x, train=False)
    np.testing.assert_allclose(evaluated, block(0.0).apply(variables, x, train=False))
    assert not np.allclose(evaluated, x)
