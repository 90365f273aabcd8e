"""DP-IQA teacher on SPAQ with the authors' settings: lr x0.2 after epoch 5."""
import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.dataset.name = "spaq"
    config.dataset.manual_dir = "~/datasets/spaq"
    config.optim.milestones = (5,)
    return config
