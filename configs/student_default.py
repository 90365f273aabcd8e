"""The student's fields (SPEC.md), added to a teacher config: the data, split and mesh stay the
teacher's, so the student trains on the teacher's split. Dataset student configs call
`authors_student(dataset config, milestones)`."""
import ml_collections
from default import optional_path


def add_student(config: ml_collections.ConfigDict, variant: str = "b7", fc_width: int = 512):
    config.unlock()
    config.student = ml_collections.ConfigDict({
        "variant": variant, "map_channels": 8, "fc_width": fc_width, "stochastic_depth_prob": 0.2,
        # torchvision efficientnet_{variant} ImageNet weights (.pth or .safetensors); None = random init
        "imagenet": optional_path(),
        # compute the teacher's maps of the train images once (WORKDIR/teacher_maps, float32,
        # 128 KiB an image at 64x64x8) instead of in every step; needs model.latents='mean'.
        # Without it, model.cache_posteriors (kept from the teacher's keys) takes the teacher's VAE
        # out of the step: half of its FLOPs at SD-1.5's size (1.11 of 2.40 TFLOP per image)
        "cache_teacher": False,
    })
    config.loss.map_weight = 1.0  # MSE(student map, teacher map) beside MSE(score, target)
    # The teacher (architecture, weights, prompt matrix) comes whole from the --teacher checkpoint
    # and is frozen: the teacher-training keys go, so that setting one is an unknown-key error
    # instead of being ignored. `model.embeddings` may still replace the teacher's prompt matrix.
    for key in ("arch", "sd_dir", "num_prompts", "init_from", "remat"):
        del config.model[key]
    del config.loss["rank_weight"]
    del config.eval["latents"]  # the student has no latents
    config.model.embeddings = None
    config.lock()
    return config


def authors_student(config: ml_collections.ConfigDict, milestones: tuple) -> ml_collections.ConfigDict:
    """The authors' distillation: B7 from ImageNet, Adam lr 1e-4, batch 24, 30 epochs, x0.2 at milestones."""
    config = add_student(config)
    config.student.imagenet = "~/models/efficientnet_b7.pth"
    config.optim.lr = 1e-4
    config.optim.milestones = milestones
    config.batch_size = 24
    config.epochs = 30
    return config
