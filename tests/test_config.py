"""Config files, `--config.KEY=VALUE` overrides and their one-line errors (no model, no data)."""
import os
import pathlib

import pytest

from dpiqa_jax.errors import UserError
from dpiqa_jax.train import config_util

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["koniq10k", "live_challenge", "flive", "spaq", "demo", "demo:smoke"])
def test_every_config_loads_locked(name):
    file, _, arg = name.partition(":")
    config = config_util.load_config(f"{CONFIGS / file}.py" + (f":{arg}" if arg else ""))
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.no_such_key = 1


def test_authors_milestones_and_hyperparameters():
    milestones = {"koniq10k": (5,), "live_challenge": (10,), "flive": (2,), "spaq": (5,)}
    for name, expected in milestones.items():
        config = config_util.load_config(str(CONFIGS / f"{name}.py"))
        assert (config.optim.lr, config.batch_size, config.epochs, config.eval.every) == (1e-5, 16, 30, 250)
        assert config.optim.milestones == expected and config.optim.decay == 0.2
        assert config.dataset.name == name


def test_overrides_are_parsed_to_the_declared_types():
    config = config_util.load_config(str(CONFIGS / "koniq10k.py"))
    pairs = config_util.split_override_args(
        ["--config.optim.lr=2e-5", "--config.batch_size", "8", "--config.checkpoint.async_save=false",
         "--config.optim.milestones=3,7", "--config.model.sd_dir=none", "--config.model.arch.latent_size=32"])
    config_util.apply_overrides(config, pairs)
    assert config.optim.lr == 2e-5 and config.batch_size == 8 and config.checkpoint.async_save is False
    assert config.optim.milestones == (3, 7) and config.model.sd_dir is None
    assert config.model.arch.latent_size == 32


@pytest.mark.parametrize("argv, message", [
    (["--config.optim.lrr=1"], "unknown config key 'optim.lrr'; valid keys: batch_size,"),
    (["--config.batch_size=eight"], "config key 'batch_size' takes a int, got 'eight'"),
    (["--config.checkpoint.async_save=maybe"], "config key 'checkpoint.async_save' takes a bool"),
    (["--config.optim=1"], "unknown config key 'optim'"),
    (["--workdir2", "x"], "unrecognised argument '--workdir2'"),
    (["--config.seed"], "--config.seed needs a value"),
])
def test_bad_overrides_are_one_line_errors(argv, message):
    config = config_util.load_config(str(CONFIGS / "koniq10k.py"))
    with pytest.raises(UserError) as error:
        config_util.apply_overrides(config, config_util.split_override_args(argv))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_student_configs_refuse_the_teacher_training_keys():
    """Distillation takes its teacher whole from --teacher: a teacher key would be silently unused."""
    config = config_util.load_config(str(CONFIGS / "student_koniq10k.py"))
    for key in ("model.remat", "model.sd_dir", "loss.rank_weight", "eval.latents"):
        with pytest.raises(UserError, match=f"unknown config key '{key}'"):
            config_util.apply_overrides(config, config_util.split_override_args([f"--config.{key}=1"]))
    # kept: the distillation step reads the teacher's cached VAE posteriors (on, as for the teacher)
    assert config.model.cache_posteriors and not config.student.cache_teacher
    config_util.apply_overrides(config, config_util.split_override_args(
        ["--config.model.latents=mean", "--config.model.cache_posteriors=false"]))
    assert config.model.latents == "mean" and not config.model.cache_posteriors


def test_missing_config_file_and_missing_get_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config_util.load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(UserError, match="no get_config"):
        config_util.load_config(str(tmp_path / "empty.py"))


NO_VARIANT = "this config has none"


@pytest.mark.parametrize("file, allowed", [("demo.py", "only 'smoke'"), ("koniq10k.py", NO_VARIANT),
                                           ("student_spaq.py", NO_VARIANT)])
def test_an_argument_the_config_refuses_is_a_one_line_error(file, allowed):
    spec = f"{CONFIGS / file}:smok"
    with pytest.raises(UserError, match=rf"^config '{spec}': unknown variant 'smok' \({allowed}\)$"):
        config_util.load_config(spec)


def test_validation_names_bad_choices_and_missing_paths():
    from dpiqa_jax.train.loop import validate

    config = config_util.load_config(str(CONFIGS / "demo.py"))
    config.model.latents = "median"
    with pytest.raises(UserError, match="'model.latents' is 'median'; choose one of 'sample', 'mean'"):
        validate(config)
    config.model.latents, config.model.remat = "mean", "true"  # a bool before there were three modes
    with pytest.raises(UserError, match="'model.remat' is 'true'; choose one of 'off', 'matmuls', 'full'"):
        validate(config)
    config = config_util.load_config(str(CONFIGS / "koniq10k.py"))
    with pytest.raises(UserError, match="config key 'model.sd_dir': path '~/models/stable-diffusion-v1-5'"):
        validate(config)


@pytest.mark.parametrize("config_file, key, value, minimum", [
    ("demo.py", "batch_size", 0, 1), ("demo.py", "eval.batch_size", 0, 1), ("demo.py", "num_steps", -1, 0),
    ("demo.py", "checkpoint.every", 0, 1), ("student_demo.py", "log_every", 0, 1)])
def test_counts_below_their_minimum_are_config_errors(config_file, key, value, minimum):
    """Before: a batch size of 0 was a ZeroDivisionError, -1 steps an evaluation at step -1."""
    from dpiqa_jax.train.loop import validate

    config = config_util.load_config(str(CONFIGS / config_file))
    group, _, name = key.rpartition(".")
    (config[group] if group else config)[name] = value
    with pytest.raises(UserError, match=rf"^config key '{key}' is {value}; it must be at least {minimum}$"):
        validate(config)


def test_a_folder_that_is_not_writable_is_refused_before_any_work(tmp_path, monkeypatch):
    from dpiqa_jax import outputs

    config = config_util.load_config(str(CONFIGS / "demo.py"))
    config.cache_dir = str(tmp_path)
    # The tests may run as root, whom the system lets write anywhere: its answer is stood in for.
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    refused = rf"^{tmp_path}: cannot be the folder of config key 'cache_dir': not writable$"
    with pytest.raises(UserError, match=refused):
        config_util.require_folder(config, "cache_dir")
    with pytest.raises(UserError, match=rf"^{tmp_path}: cannot be the maps folder: not writable$"):
        outputs.folder(str(tmp_path), "maps folder")


def test_cache_dir_is_made_and_a_folder_that_cannot_be_is_a_config_error(tmp_path):
    from dpiqa_jax.train.loop import validate

    config = config_util.load_config(str(CONFIGS / "demo.py"))
    config.cache_dir = str(tmp_path / "shared" / "caches")
    validate(config)
    assert (tmp_path / "shared" / "caches").is_dir()
    (tmp_path / "a_file").write_text("")
    config.cache_dir = str(tmp_path / "a_file" / "caches")
    refused = r"a_file/caches: cannot be the folder of config key 'cache_dir': Not a directory$"
    with pytest.raises(UserError, match=refused):
        validate(config)
