"""DP-IQA teacher on FLIVE (LIVE-FB) with the authors' settings: lr x0.2 after epoch 2."""
import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.dataset.name = "flive"
    config.dataset.manual_dir = "~/datasets/flive"
    config.optim.milestones = (2,)
    return config
