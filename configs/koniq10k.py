"""DP-IQA teacher on KonIQ-10k with the authors' settings (SPEC.md): lr x0.2 after epoch 5.

    dpiqa-jax train --config configs/koniq10k.py --workdir runs/koniq10k \
        --config.dataset.manual_dir=/data/koniq10k --config.model.sd_dir=/models/sd-v1-5 \
        --config.model.embeddings=/models/quality_embeddings.pth
"""
import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.dataset.name = "koniq10k"
    config.dataset.manual_dir = "~/datasets/koniq10k"
    config.optim.milestones = (5,)
    return config
