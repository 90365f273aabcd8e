"""`dpiqa-jax train` / `evaluate` end to end on `demo.py:smoke`, run as users run them: the files a
run writes, resuming (also after SIGKILL), a NaN stop, loading a workdir for inference."""
import json
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from train_helpers import (
    CLI,
    REPO,
    assert_resumed_as,
    assert_same_results,
    cache_folder,
    check,
    environment,
    error_line,
    records,
    results,
    run,
    stop_with_sigterm,
    train_command,
    without_clock,
    without_fit,
)

from dpiqa_jax.teacher import restore_teacher
from dpiqa_jax.train.checkpoint import workdir_lock

pytest_plugins = ("train_fixtures",)  # the session fixtures train_root and smoke_run
pytestmark = pytest.mark.slow


def test_a_run_writes_metrics_results_events_and_checkpoints(smoke_run):
    for name in ("model.json", "prompt_embeddings.npy", "metrics.jsonl", "results.json"):
        assert (smoke_run / name).is_file(), name
    assert list((smoke_run / "tensorboard").glob("events.out.tfevents.*"))
    train, test = records(smoke_run, "train"), records(smoke_run, "test")
    assert [r["step"] for r in train] == [3, 6, 9, 12] and [r["step"] for r in test] == [6, 12]
    assert {"loss", "grad_norm", "learning_rate", "images_per_second", "epoch"} <= set(train[0])
    assert {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic"} <= set(test[0])
    assert test[0]["num_images"] == 8
    final, best = results(smoke_run)["final"], results(smoke_run)["best"]
    assert final == {"step": 12, "metrics": {k: v for k, v in test[1].items() if k not in ("step", "split")}}
    for metric in ("srcc", "plcc"):
        top = max(test, key=lambda r: r[metric])  # the first of equals
        assert best[metric]["step"] == top["step"] and best[metric]["metrics"][metric] == top[metric]
        steps = [p.name for p in (smoke_run / "checkpoints" / f"best_{metric}").iterdir() if p.name.isdigit()]
        assert steps == [str(top["step"])]
    assert [p.name for p in (smoke_run / "checkpoints" / "latest").iterdir() if p.name.isdigit()] == ["12"]


def test_rerunning_a_finished_run_changes_nothing(smoke_run, train_root, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(smoke_run, workdir)
    check(run(train_command(workdir, train_root), environment(train_root)))
    assert_same_results(workdir, smoke_run)
    for split in ("train", "test"):  # the final evaluation is redone, the rest kept as written
        assert without_fit(records(workdir, split)) == without_fit(records(smoke_run, split))


def test_resume_after_sigkill_ends_as_the_uninterrupted_run(smoke_run, train_root, tmp_path):
    """Killed (SIGKILL) in the middle of writing its second checkpoint (step 12, while orbax's
    temporary folder exists), then re-run: it resumes from step 6, the last complete checkpoint,
    and on the CPU ends bit-identical to the uninterrupted run."""
    workdir = tmp_path / "killed"
    process = subprocess.Popen(train_command(workdir, train_root), env=environment(train_root), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = workdir / "checkpoints" / "latest"
    deadline = time.time() + 600

    def writing_step_12():
        return (latest / "6").is_dir() and latest.is_dir() and any(
            p.name.startswith("12.orbax-checkpoint-tmp") for p in latest.iterdir())

    while not writing_step_12() and process.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (workdir / "results.json").exists() and not (latest / "12").is_dir()
    check(run(train_command(workdir, train_root), environment(train_root)))
    assert_same_results(workdir, smoke_run)
    for split in ("train", "test"):
        assert without_clock(records(workdir, split)) == without_clock(records(smoke_run, split))


def test_sigterm_saves_the_current_step_and_a_rerun_resumes(smoke_run, train_root, tmp_path):
    """SIGTERM (a preempted machine) once training is under way: the run saves the step it is at,
    says so in one line and exits with 143; the rerun ends as the uninterrupted run."""
    workdir = tmp_path / "preempted"
    started = time.time()
    stdout, step = stop_with_sigterm(train_command(workdir, train_root), environment(train_root), workdir)
    elapsed = time.time() - started
    # Status lines go to stdout with the evaluations; the progress bar and errors to stderr.
    first = re.search(r"first step done ([0-9.]+) s after the command started \(compile included", stdout)
    assert first and 1 < float(first[1]) < elapsed, stdout[-2000:]  # imports alone take over a second
    assert 3 <= step < 12
    run_line = ("dpiqa-jax: 1 device (cpu) in 1 process, mesh data 1 x fsdp 1; batch 16 (16 per device), "
                "24 train images; steps: 12 (1 per epoch), ")
    assert stdout.startswith(run_line + "from step 0\n"), stdout[:500]
    rerun = check(run(train_command(workdir, train_root), environment(train_root)))
    assert rerun.stdout.startswith(run_line + f"resuming after step {step}\n"), rerun.stdout[:500]
    assert "(compile included; the train step's stored program)" in rerun.stdout  # no trace on a resume
    assert_resumed_as(workdir, smoke_run)


def test_a_second_run_in_a_workdir_in_use_stops_with_one_line(train_root, tmp_path):
    """The same command started twice (a job resubmitted while the first still runs): the second
    stops before any work with one line naming the workdir and the first run's process, instead of
    both writing checkpoints there. Once the first run is gone (killed here) the workdir is free."""
    workdir = tmp_path / "busy"
    first = subprocess.Popen(train_command(workdir, train_root), env=environment(train_root), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        said = first.stdout.readline()  # the run's first line comes once it holds the workdir
        assert said.startswith("dpiqa-jax: 1 device"), said
        second = run(train_command(workdir, train_root), environment(train_root), timeout=300)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    assert error_line(second.stderr, "train") == (
        f"{workdir} is in use by another run (pid {first.pid} on {socket.gethostname()}): wait for it to "
        "end, or give this run another workdir")
    assert "dpiqa-jax: " not in second.stdout  # it stopped before the run line
    with workdir_lock(str(workdir)):  # the kernel let go of the killed run's lock
        pass


def test_a_workdir_that_cannot_be_one_is_a_one_line_error(train_root, tmp_path):
    (tmp_path / "taken").write_text("a file")
    for workdir, reason in ((tmp_path / "taken", "a file is in its place"),
                            (tmp_path / "taken" / "run", "Not a directory")):
        result = run(train_command(workdir, train_root), environment(train_root), timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert error_line(result.stderr, "train") == f"{workdir}: cannot be the run's workdir: {reason}"


def test_a_first_run_that_fails_before_writing_anything_leaves_no_workdir(train_root, tmp_path):
    """A dataset not yet downloaded (its manual folder empty): the one line, and no workdir holding
    only the lock file; a workdir that existed before stays."""
    (tmp_path / "manual").mkdir()
    not_downloaded = ["--config.dataset.name=koniq10k", f"--config.dataset.manual_dir={tmp_path / 'manual'}",
                      f"--config.dataset.data_dir={tmp_path / 'tfds'}"]
    for workdir in (tmp_path / "new", tmp_path / "old"):
        if workdir.name == "old":
            workdir.mkdir()
        result = run(train_command(workdir, train_root, *not_downloaded), environment(train_root))
        assert "manual folder" in error_line(result.stderr, "train")
        assert workdir.exists() == (workdir.name == "old")


def test_a_nan_loss_stops_the_run_and_saves_nothing(train_root, tmp_path):
    nan = np.full((64, 32), np.nan, np.float32)  # demo.py's prompt matrix shape, all NaN
    np.save(tmp_path / "nan.npy", nan)
    workdir = tmp_path / "nan"
    result = run(train_command(workdir, train_root, f"--config.model.embeddings={tmp_path / 'nan.npy'}"),
                 environment(train_root))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dpiqa-jax train: error: non-finite loss and grad_norm at step 1"), last
    assert not [p for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit()]
    assert records(workdir, "train")[-1]["step"] == 1


def test_the_train_step_compiled_ahead_is_the_one_the_first_step_runs(train_root, tmp_path):
    """The loop compiles the train step (the stored program of `exported`) on a thread of its own
    while the state and the posterior cache load; the first step must find that executable, not
    compile the step a second time."""
    env = environment(train_root) | {"JAX_LOG_COMPILES": "1"}
    result = check(run(train_command(tmp_path / "once", train_root, "--config.num_steps=1"), env))
    assert result.stderr.count("Finished XLA compilation of jit(stored_step)") == 1
    assert "Finished XLA compilation of jit(train_step)" not in result.stderr


def test_a_failed_checkpoint_save_stops_the_run_with_the_reason(train_root, tmp_path):
    """A write that the file system refuses (here: a file-size limit, as a full disk would) in
    orbax's background save: the run exits non-zero with one line naming the folder and the OS's
    reason, instead of training on without checkpoints."""
    import resource

    # Below the largest parameter array (a 3x3x64x64 kernel, 147 kB), however orbax groups arrays
    # into files; JAX only warns when it cannot write its compilation cache.
    limit = 64 << 10
    workdir = tmp_path / "full"
    result = subprocess.run(train_command(workdir, train_root), env=environment(train_root), cwd=REPO,
                            capture_output=True, text=True, timeout=600,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 2, result.stderr[-3000:]
    ours = error_line(result.stderr, "train")
    assert ours.startswith(f"{workdir / 'checkpoints'}"), ours
    assert "saving a checkpoint failed" in ours and "File too large" in ours, ours
    assert records(workdir, "train")[-1]["step"] == 6  # stopped at the first save, not at the end


def _damage(folder):
    """Cuts the largest data file of an orbax item in half (a disk or a copy gone wrong)."""
    data = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def test_a_damaged_checkpoint_is_one_line_naming_its_folder(smoke_run, train_root, tmp_path):
    import shutil

    workdir = tmp_path / "damaged"
    shutil.copytree(smoke_run, workdir)
    best = workdir / "checkpoints" / "best_srcc" / str(results(smoke_run)["best"]["srcc"]["step"])
    latest = workdir / "checkpoints" / "latest" / "12"
    _damage(best / "params")
    _damage(latest / "opt_state")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 120, 60)).save(image)
    commands = {"predict": (CLI + ["predict", "--checkpoint", str(workdir), str(image)], best / "params"),
                "train": (train_command(workdir, train_root), latest)}
    for name, (command, folder) in commands.items():
        result = run(command, environment(train_root))
        assert result.returncode == 2, result.stderr[-3000:]
        assert error_line(result.stderr, name).startswith(f"{folder}: cannot restore this checkpoint")


def test_init_from_starts_training_from_the_checkpoint(smoke_run):
    """Fine-tuning: `model.init_from` gives the run the checkpoint's weights and prompt matrix."""
    import jax

    from dpiqa_jax.train.config_util import apply_overrides, load_config
    from dpiqa_jax.train.loop import teacher_task

    config = load_config(str(REPO / "configs" / "demo.py") + ":smoke")
    apply_overrides(config, [("model.init_from", str(smoke_run))])
    task = teacher_task(config)
    _, params, embeddings = restore_teacher(str(smoke_run))
    jax.tree.map(np.testing.assert_array_equal, task.init_params(), params)
    np.testing.assert_array_equal(task.embeddings, embeddings)


def test_the_posterior_cache_holds_the_vaes_posteriors_of_the_train_images(smoke_run, train_root):
    """demo.py caches the frozen VAE's posteriors: one row per train image, in index order, equal to
    the VAE's own, with the record of what made them."""
    import jax

    from dpiqa_jax.data.pipeline import eval_batches
    from dpiqa_jax.models.dpiqa import DPIQA
    from dpiqa_jax.train.step import POSTERIOR

    folder = cache_folder(smoke_run, "vae_posteriors")
    cached = [np.load(folder / f"{name}.npy") for name in POSTERIOR]
    identity = json.loads((folder / "identity.json").read_text())
    assert identity["dataset"] == "synthetic_iqa/tiny" and identity["dtype"] == "float32"
    cfg, params, _ = restore_teacher(str(smoke_run))
    batch = next(iter(eval_batches("synthetic_iqa/tiny", "official", batch_size=len(cached[0]), part="train",
                                   image_size=cfg.image_size, data_dir=str(train_root / "tfds"))))
    assert batch["mask"].all() and list(batch["index"]) == sorted(batch["index"])
    encode = jax.jit(lambda p, x: DPIQA(cfg).apply({"params": p}, x, method="encode"))
    expected = encode(params, batch["image"])
    for got, want in zip(cached, expected, strict=True):
        # float32, another batch size (24 here, 32 in the pass): measured 1.2e-5 of the largest value
        assert np.abs(got - want).max() <= 5e-5 * np.abs(want).max() and np.std(want) > 0


def test_restore_teacher_from_a_workdir_or_a_checkpoint_folder(smoke_run):
    cfg, params, embeddings = restore_teacher(str(smoke_run))
    from dpiqa_jax.teacher import teacher_config_from_dict

    assert cfg == teacher_config_from_dict(json.loads((smoke_run / "model.json").read_text()))
    np.testing.assert_array_equal(embeddings, np.load(smoke_run / "prompt_embeddings.npy"))
    assert set(params) == {"vae", "unet", "img_adapter", "text_adapter", "gamma", "QFD"}
    best = smoke_run / "checkpoints" / "best_srcc"
    for path in (best, best / str(results(smoke_run)["best"]["srcc"]["step"])):
        _, same, _ = restore_teacher(str(path))
        np.testing.assert_array_equal(same["gamma"], params["gamma"])
    _, latest, _ = restore_teacher(str(smoke_run / "checkpoints" / "latest"))
    assert latest["QFD"]["fc3"]["kernel"].shape == params["QFD"]["fc3"]["kernel"].shape


def test_evaluate_command_reproduces_the_best_evaluation(smoke_run, train_root, tmp_path):
    out = tmp_path / "eval"
    said = check(run(CLI + ["evaluate", "--checkpoint", str(smoke_run),
                      "--dataset", "synthetic_iqa/tiny", "--protocol", "official", "--batch-size", "32",
                      "--data-dir", str(train_root / "tfds"), "--output", str(out)], environment(train_root)))
    assert "synthetic_iqa/tiny test: 100%|██████████| 1/1 " in said.stderr  # its progress bar: 8 images
    got = json.loads((out / "results.json").read_text())
    best = results(smoke_run)["best"]["srcc"]["metrics"]
    assert got["num_images"] == 8 and got["srcc"] == pytest.approx(best["srcc"], abs=1e-6)
    assert got["plcc"] == pytest.approx(best["plcc"], rel=1e-5)
    assert len((out / "predictions.csv").read_text().splitlines()) == 9
    assert (out / "scatter.png").stat().st_size > 10_000


def test_config_mistakes_are_one_line_errors_before_any_work(train_root, tmp_path):
    workdir = tmp_path / "never"
    for override, message in (
            ("--config.optim.lrr=1", "unknown config key 'optim.lrr'; valid keys: batch_size, cache_dir,"),
            ("--config.batch_size=x", "config key 'batch_size' takes a int, got 'x'"),
            ("--config.model.sd_dir=/no/such/sd", "config key 'model.sd_dir': path '/no/such/sd' does not")):
        result = run(train_command(workdir, train_root, override), environment(train_root), timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"dpiqa-jax train: error: {message}"), lines[0]
        assert not workdir.exists()
