"""The attention kernels: which one each setting picks, and the fast ones computing what XLA's does.

The Pallas TPU kernel runs here in Pallas' TPU interpret mode (the same kernel, emulated on the
CPU); cuDNN's is only traced here (what JAX builds for it) and needs an NVIDIA GPU to run:
benchmarks/attention_kernels.py checks it against XLA's there (issue 7)."""
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from train_helpers import REPO

from dpiqa_jax.models.attention import TPU_BLOCK, attend, choose, cudnn_attention
from dpiqa_jax.models.unet import UNetConfig, UNetFeatures
from dpiqa_jax.train import exported, loop, schedule
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train import state as state_lib
from dpiqa_jax.train.config_util import load_config
from dpiqa_jax.train.inputs import train_fields

TOL = 1e-5


@pytest.mark.parametrize("implementation, platform, dtype, length, head, kernel", [
    ("auto", "gpu", jnp.bfloat16, 4096, 40, "cudnn"),
    ("auto", "gpu", jnp.float16, 77, 256, "cudnn"),
    ("auto", "gpu", jnp.float32, 4096, 40, "xla"),  # cuDNN's fused attention is for half precision
    ("auto", "gpu", jnp.bfloat16, 4096, 512, "xla"),  # the VAE's head: wider than cuDNN's
    ("auto", "gpu", jnp.bfloat16, 4096, 36, "xla"),  # not in steps of 8
    ("auto", "tpu", jnp.bfloat16, 4096, 40, "tpu_flash"),
    ("auto", "tpu", jnp.float32, 1024, 512, "tpu_flash"),
    ("auto", "tpu", jnp.bfloat16, 64, 40, "xla"),  # fewer queries than one block
    ("auto", "tpu", jnp.bfloat16, 200, 40, "xla"),  # not whole blocks
    ("auto", "cpu", jnp.bfloat16, 4096, 40, "xla"),
    ("xla", "gpu", jnp.bfloat16, 4096, 40, "xla"),
    ("cudnn", "gpu", jnp.float32, 4096, 512, "cudnn"),  # asked for: cuDNN's own error if it cannot
    ("tpu_flash", "cpu", jnp.float32, 256, 40, "tpu_flash"),
    ("tpu_flash", "tpu", jnp.float32, 16, 40, "xla"),
])
def test_each_setting_picks_its_kernel(implementation, platform, dtype, length, head, kernel):
    assert choose(implementation, platform, dtype, length, head) == kernel


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="'flash'.*known"):
        choose("flash", "gpu", jnp.bfloat16, 4096, 40)


def test_auto_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
    """On a GPU in bfloat16 'auto' asks cuDNN first; where cuDNN refuses when traced (here: this
    machine has none, as a GPU may refuse a head size), the call runs on XLA's kernel instead, with a
    warning that names the shape and cuDNN's reason, while an explicit 'cudnn' reports cuDNN's own
    error."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 16, 16, heads=2, dim=8))
    expected = jax.nn.dot_product_attention(q, k, v)
    with pytest.warns(UserWarning, match=r"^attention of 16 queries on 16 keys \(2 heads of 8\) runs on "
                                         r"XLA's kernel: cuDNN's refused it \(cuDNN is not detected\.\)$"):
        assert jnp.array_equal(attend(q, k, v, "auto"), expected)
    with pytest.raises(RuntimeError, match="cuDNN"):
        attend(q, k, v, "cudnn")


def _qkv(batch, queries, keys, heads, dim, kv_batch=None):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (batch, queries, heads, dim))
    k, v = (jax.random.normal(key, (kv_batch or batch, keys, heads, dim)) for key in (kk, kv))
    # Keys and values of a batch-1 context reach the kernel broadcast, as the Attention module does.
    return q, jnp.broadcast_to(k, (batch,) + k.shape[1:]), jnp.broadcast_to(v, (batch,) + v.shape[1:])


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("queries, keys, kv_batch", [
    (256, 256, None),  # self-attention, whole blocks
    (128, 77, 1),  # cross-attention on a shared context shorter than a block
    (256, 300, 1),  # ... and one that ends mid-block (SD-1.5's 1485 prompts do)
])
def test_the_tpu_flash_kernel_and_its_gradient_match_xla(queries, keys, kv_batch):
    q, k, v = _qkv(2, queries, keys, heads=2, dim=40, kv_batch=kv_batch)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def forward_and_grads(implementation):
        out, vjp = jax.vjp(lambda *a: attend(*a, implementation), q, k, v)
        return out, vjp(cotangent)

    with pltpu.force_tpu_interpret_mode():
        flash = forward_and_grads("tpu_flash")
    plain = forward_and_grads("xla")
    assert _rel(flash[0], plain[0]) < TOL
    for name, a, b in zip("qkv", flash[1], plain[1], strict=True):
        assert _rel(a, b) < TOL, name
    # The padded keys are masked out: a kernel that let them in would differ by far more.
    assert _rel(jax.nn.dot_product_attention(q, jnp.pad(k, ((0, 0), (0, 3), (0, 0), (0, 0))),
                                             jnp.pad(v, ((0, 0), (0, 3), (0, 0), (0, 0)))), plain[0]) > 1e-3


def test_the_unet_on_the_tpu_flash_kernel_matches_xla():
    """A tiny U-Net whose first level has whole blocks of queries (16 x 16 latents = 2 blocks), on a
    shared context: the kernel is the Pallas one there, and the up-block outputs equal XLA's.
    (Gradients are checked on the kernel above: emulating its backward pass through a whole U-Net
    takes minutes here.)"""
    config = UNetConfig(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=1,
                        cross_attention_dim=16, layers_per_block=1)
    assert 16 * 16 == 2 * TPU_BLOCK
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    latents = jax.random.normal(keys[0], (1, 16, 16, 4))
    context = jax.random.normal(keys[1], (1, 7, 16))
    # Random weights of the right shapes (Flax's init, run op by op or compiled, takes half a minute).
    shapes, tree = jax.tree.flatten(jax.eval_shape(UNetFeatures(config).init, keys[2], latents, 1, context))
    rng = np.random.default_rng(0)
    params = tree.unflatten([0.2 * rng.standard_normal(x.shape, np.float32) for x in shapes])["params"]

    def run(implementation):
        model = UNetFeatures(config, attention=implementation)
        apply = lambda p: model.apply({"params": p}, latents, 1, context)
        traced = jax.jit(apply).trace(params)
        return "pallas_call" in str(traced.jaxpr), traced.lower().compile()(params)

    with pltpu.force_tpu_interpret_mode():
        used, flash = run("tpu_flash")
    unused, plain = run("xla")
    assert used and not unused
    errors = [_rel(a, b) for a, b in zip(flash, plain, strict=True)]
    assert max(errors) < TOL, errors


@pytest.fixture
def traced_cudnn(monkeypatch):
    """JAX traces cuDNN's kernel here as on a GPU with cuDNN 9.10 (nothing is compiled or run)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda *_: 91000)


def test_cudnn_trains_on_an_odd_number_of_keys(traced_cudnn):
    """JAX's cuDNN training path turns down 1485 prompts (an odd number of keys): they get one zero key
    more, masked out by the keys' length, instead of a fall back to XLA's kernel in the train step."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 16, 7, heads=2, dim=8, kv_batch=1))
    loss = lambda *a: jnp.sum(attend(*a, "cudnn").astype(jnp.float32))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert "dot_product_attention_bwd_wrapper" in jaxpr and "mask_type=MaskType.PADDING" in jaxpr


def test_the_padded_keys_leave_the_attention_as_it_was(monkeypatch):
    """What the cuDNN call computes, run by XLA's kernel, which takes the same arguments (cuDNN's own
    numbers need a GPU: benchmarks/attention_kernels.py): the padded key changes neither the output nor the
    gradients. Left in the softmax it would."""
    real = jax.nn.dot_product_attention
    keys = []

    def as_xla(q, k, v, **options):
        keys.append(k.shape[1])
        return real(q, k, v, **options | {"implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    q, k, v = _qkv(2, 16, 7, heads=2, dim=8, kv_batch=1)
    cotangent = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    padded = jax.vjp(cudnn_attention, q, k, v)
    plain = jax.vjp(lambda *a: real(*a, implementation="xla"), q, k, v)
    assert keys == [8]
    assert _rel(padded[0], plain[0]) < TOL
    for name, a, b in zip("qkv", padded[1](cotangent), plain[1](cotangent), strict=True):
        assert _rel(a, b) < TOL, name


@pytest.mark.parametrize("kernel, forward", [("cudnn", "dot_product_attention_fwd_wrapper["),
                                             ("tpu_flash", "pallas_call[")])
def test_remat_matmuls_keeps_the_fused_kernels_outputs(kernel, forward, traced_cudnn):
    """`model.remat=matmuls` keeps what a fused kernel's backward pass reads (its output and softmax
    statistics), so its forward pass runs once per attention in a train step, as without remat;
    `full` runs it again."""
    config = UNetConfig(block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=1,
                        cross_attention_dim=16, layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    latents, context = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 7, 16))

    def forward_kernels(remat):
        model = UNetFeatures(config, dtype=jnp.bfloat16, remat=remat, attention=kernel)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), latents, 1, context)
        loss = lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in model.apply(p, latents, 1, context))  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params)).count(forward)

    off, matmuls, full = map(forward_kernels, ("off", "matmuls", "full"))
    assert off > 0 and matmuls == off and full > off, (off, matmuls, full)


def test_the_trainers_step_lowers_for_cuda_with_cudnn_once_in_every_attention(traced_cudnn):
    """The trainer's teacher step (the demo's U-Net at 128 px: every level's queries even; 63 prompts,
    bfloat16, `remat=matmuls`, cached posteriors), exported for CUDA from this CPU as JAX lowers it on
    a GPU (XLA's compile of it needs one): each of the 10 transformers' two attentions is one cuDNN
    forward kernel and one backward kernel, none left to XLA nor run twice."""
    config = load_config(str(REPO / "configs" / "demo.py"))
    config.model.update(attention="cudnn", dtype="bfloat16", remat="matmuls", num_prompts=63,
                        cache_posteriors=True)
    config.model.arch.latent_size = 16
    task = loop.teacher_task(config)
    tx = schedule.optimizer(config.optim, schedule.learning_rate(config.optim, 9, 9))
    mesh = mesh_lib.make_mesh(1)
    state, shardings = state_lib.layout(task.param_shapes, tx, mesh)
    train_step, _, embeddings = task.compile_steps(tx, mesh, shardings)
    batch = {key: jax.ShapeDtypeStruct((2, *shape), dtype)
             for key, (shape, dtype) in train_fields(task.image_size, task.joined).items()}
    lowered = jax.export.export(train_step, platforms=["cuda"], disabled_checks=exported.ANY_CUSTOM_CALL)(
        state, batch, embeddings)
    kernels = collections.Counter(re.findall(r"custom_call @([\w$]+)", lowered.mlir_module()))
    assert kernels == {"__cudnn$fmhaSoftmax": 20, "__cudnn$fmhaSoftmaxBackward": 20}
