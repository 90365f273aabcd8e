"""The demo main job: a tiny SD-like teacher, randomly initialised, on the built-in synthetic_iqa.

    dpiqa-jax train --config configs/demo.py --workdir runs/demo         # minutes on a laptop CPU
    dpiqa-jax train --config configs/demo.py:smoke --workdir runs/smoke  # about a minute, for tests

No downloads: random prompt embeddings stand in for CLIP's, and nothing is pretrained.
"""
import default

from dpiqa_jax.models.dpiqa import TeacherConfig
from dpiqa_jax.models.unet import UNetConfig
from dpiqa_jax.models.vae import VAEConfig

# 64 px images -> 8x8 latents; the U-Net keeps SD-1.5's block layout at a fraction of its width.
TINY = TeacherConfig(
    unet=UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=2,
                    cross_attention_dim=32, norm_num_groups=8),
    vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    latent_size=8, adapter_res_blocks=1)
TINY_DECODER = {"width": 32, "reduction": 4, "score_channels": (16, 8, 8), "fc_width": 64}


def get_config(arg=None):
    config = default.get_config()
    config.dataset.name = "synthetic_iqa"
    config.dataset.manual_dir = None
    config.dataset.split = "official"  # train and test crops come from disjoint photos
    config.model.arch = default.model_arch(TINY, TINY_DECODER)
    config.model.sd_dir = None
    config.model.embeddings = None
    config.model.num_prompts = 64
    config.model.dtype = "float32"
    config.model.remat = "off"  # a tiny model: memory to spare
    config.optim.lr = 1e-3
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 50
    config.batch_size = 32
    config.epochs = 10
    config.log_every = 20
    config.eval.every = 200
    config.eval.batch_size = 64
    config.checkpoint.every = 200
    if arg == "smoke":
        config.dataset.name = "synthetic_iqa/tiny"  # 24 train / 8 test images
        config.num_steps = 12
        config.batch_size = 16
        config.eval.every = 6
        config.eval.batch_size = 32
        config.checkpoint.every = 6
        config.log_every = 3
        # Adam's eps 1e-8 turns the float32 rounding noise of near-zero gradients (which differs
        # with the number of devices) into full-size updates: runs on 1 and 8 devices then drift
        # apart 10x per step (measured: 8e-7 at step 1, 4e-3 at step 6). At 1e-4 they agree to 2e-5
        # over the whole run, which the sharding tests check.
        config.optim.eps = 1e-4
    elif arg:
        raise ValueError(f"unknown variant {arg!r} (only 'smoke')")
    return config
