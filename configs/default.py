"""Fields shared by every config: the authors' teacher settings (SPEC.md) on SD-1.5.

Dataset configs import this file (`import default`) and change a few fields. Paths are
placeholders the user overrides, e.g. `--config.model.sd_dir=/models/stable-diffusion-v1-5`.
"""
import ml_collections
from ml_collections import config_dict

from dpiqa_jax.models.dpiqa import TeacherConfig
from dpiqa_jax.teacher import teacher_config_to_dict

# The authors' quality feature decoder, spelled out so that every width can be overridden.
AUTHORS_DECODER = {"width": 512, "reduction": 16, "score_channels": (128, 32, 8), "fc_width": 512}


SD15_TEACHER = TeacherConfig()


def model_arch(cfg: TeacherConfig = SD15_TEACHER, decoder: dict = AUTHORS_DECODER) -> dict:
    return teacher_config_to_dict(cfg) | {"decoder": dict(decoder)}


def optional_path(default=None) -> config_dict.FieldReference:
    """A path setting that may be None and keeps its type (str) for `--config.KEY=...` overrides."""
    return config_dict.FieldReference(default, field_type=str)


def get_config(arg=None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"unknown variant {arg!r} (this config has none)")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = ml_collections.ConfigDict({
        "name": "koniq10k",
        "manual_dir": optional_path("~/datasets/koniq10k"),  # the downloaded dataset (labels and images)
        "data_dir": optional_path(),  # where TFDS keeps the prepared dataset (None: TFDS's default)
        # 'random[:SEED[:FRACTION]]' (the authors' seeded 80/20), 'official[:PART]' or 'indices:TRAIN[,TEST]'
        "split": "random",
        # building the dataset leaves out unreadable images (and reports them) instead of failing
        "skip_bad_images": False,
    })

    config.model = ml_collections.ConfigDict({
        "arch": model_arch(),  # teacher_config_from_dict fields: unet, vae, latent_size, decoder...
        # diffusers SD-1.5 folder for the U-Net and VAE weights; None = random init
        "sd_dir": optional_path("~/models/stable-diffusion-v1-5"),
        # prompt matrix (.pth, .npy or .safetensors); None = a fixed random matrix (the demo)
        "embeddings": optional_path("~/models/quality_embeddings.pth"),
        "num_prompts": 1485,  # rows of the random demo prompt matrix (embeddings None)
        # fine-tune a teacher checkpoint (the authors' .pth, a workdir): its architecture, weights and
        # prompt matrix (unless `embeddings` is set) start the run; `arch` and `sd_dir` are then unused
        "init_from": optional_path(),
        "dtype": "bfloat16",  # compute dtype; params and Adam state stay float32
        # what the U-Net's layers keep for the backward pass: 'off' (everything: about 1.9 GiB per
        # image with a fused attention kernel, 7.7 with XLA's), 'matmuls' (the convolutions' and
        # dense layers' outputs, 0.54 GiB: norms, activations and XLA's attention probabilities run
        # again) or 'full' (their inputs, 0.17 GiB: with fsdp, what fits 16 GB chips)
        "remat": "matmuls",
        # the U-Net's attention kernel: 'auto' (cuDNN on GPUs in bfloat16, Pallas flash attention on
        # TPUs, XLA elsewhere), or one of 'xla', 'cudnn', 'tpu_flash'
        "attention": "auto",
        "latents": "sample",  # 'sample' the VAE posterior as the authors, or take its 'mean'
        # one pass of the frozen VAE over the train images stores each posterior (mean and std) in
        # the workdir (the draw is still made in the step): no VAE forward pass in the train step,
        # a quarter of its FLOPs at SD-1.5's size; the pass costs under 1 % of 30 epochs' steps
        "cache_posteriors": True,
    })

    config.optim = ml_collections.ConfigDict({
        "lr": 1e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8,  # torch Adam defaults, no weight decay
        "schedule": "step",  # 'step': x decay after each epoch in milestones; 'cosine': warmup + cosine
        "milestones": (5,), "decay": 0.2,
        "warmup_steps": 0, "final_lr_ratio": 0.0,  # 'cosine' only
    })
    config.loss = ml_collections.ConfigDict({"rank_weight": 0.0})  # SPEC's ranking loss, off as the authors

    config.batch_size = 16  # global, over all devices of all processes
    config.epochs = 30
    config.num_steps = 0  # > 0: train this many steps instead of `epochs`
    config.log_every = 50
    config.eval = ml_collections.ConfigDict({
        "every": 250, "batch_size": 16,
        "latents": "mean",  # deterministic evaluation; 'sample' draws as the authors' code does
    })
    config.checkpoint = ml_collections.ConfigDict({"every": 250, "async_save": True})
    # where the per-image caches of frozen models go (model.cache_posteriors, student.cache_teacher),
    # each in a folder named by a digest of what made it: a folder shared by runs makes each cache
    # once for all of them (same model, dataset, split and image size); None: the workdir
    config.cache_dir = optional_path()
    config.mesh = ml_collections.ConfigDict({"fsdp": 1})  # > 1 shards params and Adam state over fsdp devices
    return config
