"""DP-IQA teacher on LIVE Challenge (CLIVE) with the authors' settings: lr x0.2 after epoch 10,
seeded 80/20 split (`--config.dataset.split_seed` picks one of the protocol's splits)."""
import default


def get_config(arg=None):
    config = default.get_config(arg)
    config.dataset.name = "live_challenge"
    config.dataset.manual_dir = "~/datasets/ChallengeDB_release"
    config.optim.milestones = (10,)
    return config
