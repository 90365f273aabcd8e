"""`dpiqa-jax distill` end to end on `student_demo.py:smoke`, from the smoke teacher run: the files
it writes, and its workdir used as a checkpoint by predict, export and evaluate."""
import json

import numpy as np
import pytest
from PIL import Image
from train_helpers import (
    CLI,
    REPO,
    assert_resumed_as,
    assert_same_run,
    cache_folder,
    check,
    environment,
    locked,
    records,
    results,
    run,
    run_line,
    stop_processes_with_sigterm,
    stop_with_sigterm,
)

import dpiqa_jax
from dpiqa_jax.commands import evaluate as evaluate_command
from dpiqa_jax.data.pipeline import eval_batches

pytest_plugins = ("train_fixtures",)  # the session fixtures train_root and smoke_run
pytestmark = pytest.mark.slow

STUDENT_SMOKE = str(REPO / "configs" / "student_demo.py") + ":smoke"
LOSSES = ("loss", "mse", "map_loss", "grad_norm")  # SPEC's loss: score MSE + map MSE
# The smoke student's scores differ only in their 6th digit: PLCC is then float noise (measured
# 0.060 vs 0.044 with another batch size; -0.562 vs -0.566 in a resumed run whose losses agree with
# the uninterrupted one's to 3e-7), so RMSE stands in for it.
METRICS = ("srcc", "krcc", "rmse")


def distill_command(workdir, teacher, train_root, *overrides: str) -> list[str]:
    return CLI + ["distill", "--config", STUDENT_SMOKE, "--workdir", str(workdir), "--teacher", str(teacher),
                  f"--config.dataset.data_dir={train_root / 'tfds'}", *overrides]


@pytest.fixture(scope="session")
def student_run(smoke_run, train_root):
    """One 1-device distillation from the smoke teacher, made once for every xdist worker: (its
    workdir, its stderr, with the compiles logged)."""
    workdir, stderr = train_root / "student_1device", train_root / "student_1device.stderr"
    with locked(workdir):
        if not stderr.exists():
            env = environment(train_root) | {"JAX_LOG_COMPILES": "1"}
            stderr.write_text(check(run(distill_command(workdir, smoke_run, train_root), env)).stderr)
    return workdir, stderr.read_text()


def test_distill_smoke_run_then_predict_and_export_its_workdir(student_run, smoke_run, train_root, tmp_path):
    workdir, stderr = student_run
    env = environment(train_root)
    # compiled ahead (the stored program), while the teacher's maps were cached, and found by the first step
    assert stderr.count("Finished XLA compilation of jit(stored_step)") == 1
    assert "Finished XLA compilation of jit(distill_step)" not in stderr
    spec = json.loads((workdir / "student.json").read_text())
    teacher_side = json.loads((smoke_run / "model.json").read_text())["latent_size"] * 8
    assert spec == {"variant": "tiny", "map_channels": 8, "fc_width": 64, "image_size": teacher_side}
    train, test = records(workdir, "train"), records(workdir, "test")
    assert [r["step"] for r in train] == [3, 6, 9, 12] and [r["step"] for r in test] == [6, 12]
    for r in train:  # SPEC's loss: score MSE + map MSE, both logged
        assert r["loss"] == pytest.approx(r["mse"] + r["map_loss"], rel=1e-5) and r["map_loss"] > 0
    assert results(workdir)["final"]["metrics"]["num_images"] == 8
    assert not (workdir / "model.json").exists()  # a student workdir is never taken for a teacher
    check_teacher_cache(workdir, smoke_run, train_root)

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), np.uint8)).save(image)
    exported = tmp_path / "student.msgpack"
    export = ["export", "--checkpoint", str(workdir), "--format", "msgpack", "--output", str(exported)]
    check(run(CLI + export, env))
    scores = []
    for checkpoint in (workdir, exported):
        out = tmp_path / f"{checkpoint.name}.json"
        check(run(CLI + ["predict", "--checkpoint", str(checkpoint), "--output", str(out), str(image)], env))
        scores.append(json.loads(out.read_text())[0]["score"])
    assert np.isfinite(scores[0]) and scores[0] == scores[1]

    best = results(workdir)["best"]["srcc"]["metrics"]
    out = tmp_path / "eval"  # evaluate takes students too, reproducing the run's own evaluation
    table = check(run(CLI + ["evaluate", "--checkpoint", str(workdir), str(exported), "--dataset",
                             "synthetic_iqa/tiny", "--protocol", "official", "--batch-size", "32",
                             "--data-dir", str(train_root / "tfds"), "--output", str(out)], env)).stdout
    names = evaluate_command.labels([str(workdir), str(exported)])
    assert table.startswith("| checkpoint | synthetic_iqa/tiny |")
    assert table == (out / "table.md").read_text() + "\n"  # print adds a newline
    for name in names:
        got = json.loads((out / name / "synthetic_iqa-tiny" / "results.json").read_text())
        assert f"| {name} | {got['srcc']:.4f} / {got['plcc']:.4f} |" in table
        assert (out / name / "synthetic_iqa-tiny" / "scatter.png").stat().st_size > 10_000
        assert got["num_images"] == 8 and got["srcc"] == pytest.approx(best["srcc"], abs=1e-6)
        assert got["rmse"] == pytest.approx(best["rmse"], rel=1e-6)  # not PLCC: see METRICS


def test_a_distillation_stopped_by_sigterm_resumes_and_ends_as_the_uninterrupted_one(student_run, smoke_run,
                                                                                     train_root, tmp_path):
    """SIGTERM once the student trains: the step is saved with its batch-norm statistics, Adam state,
    RNG and data position; the rerun reuses the teacher maps the first run cached and ends, on the
    CPU, with the uninterrupted distillation's every evaluation and results to the last bit."""
    workdir = tmp_path / "preempted"
    command = distill_command(workdir, smoke_run, train_root)
    stdout, step = stop_with_sigterm(command, environment(train_root), workdir, "distill")
    assert 3 <= step < 12 and f"{cache_folder(workdir, 'teacher_maps')}: one pass over" in stdout
    rerun = check(run(command, environment(train_root))).stdout
    assert f"resuming after step {step}\n" in rerun and "one pass over" not in rerun
    assert_resumed_as(workdir, student_run[0])


def test_a_2_process_distillation_matches_1_device_and_resumes_on_1_device_after_sigterm(
        student_run, smoke_run, train_root, tmp_path):
    """Multi-host distillation on a 2 (data) x 2 (fsdp) mesh: the teacher's maps cached by both
    processes' pass (found under the same key as on 1 device), the student's batch-norm statistics
    those of the global batch, its params and Adam state sharded: the same losses as on 1 device.
    Then preempted (SIGTERM to process 1): both processes save one step, and the same command on
    one device resumes from it (the sharded params, Adam state, batch-norm statistics, RNG and data
    position) and ends as the 1-device distillation. Only the 2 processes' first log window is
    compared: in the next ones the student's training amplifies float rounding (measured against
    the 1-device run when the 2 processes ran to the end: 4e-7, 1.5e-4, 1e-3, 3e-3 in the four
    windows' losses), whereas batch statistics of one device's 4 images instead of the global 16
    would change the first window's loss by far more."""
    workdir = tmp_path / "student"
    command = distill_command(workdir, smoke_run, train_root, "--config.mesh.fsdp=2")
    outs, step = stop_processes_with_sigterm(command, environment(train_root, devices=2), workdir, "distill")
    said = run_line(outs[0])
    assert said.startswith("dpiqa-jax: 4 devices (cpu) in 2 processes, mesh data 2 x fsdp 2; "), said
    assert 3 <= step < 12, step
    reference = student_run[0]
    maps = [cache_folder(run, "teacher_maps") for run in (reference, workdir)]  # written by process 0
    assert maps[0].name == maps[1].name  # the teacher's digest does not depend on the mesh
    ours, reference_maps = (np.load(folder / "teacher_map.npy") for folder in reversed(maps))
    assert np.abs(ours - reference_maps).max() <= 1e-5 * np.abs(reference_maps).max()  # measured 9e-7
    rerun = check(run(distill_command(workdir, smoke_run, train_root), environment(train_root))).stdout
    assert run_line(rerun).endswith(f"resuming after step {step}") and "one pass over" not in rerun, rerun
    assert_same_run(reference, workdir, until=3, losses=LOSSES)  # the 2 processes' first window
    assert_same_run(reference, workdir, after=step, losses=LOSSES, metrics=METRICS)  # measured 3e-7


def check_teacher_cache(workdir, teacher, train_root):
    """student_demo caches the teacher's maps: one row per train image, equal to the teacher's own
    mean-latent maps of that image, with the record of what made them."""
    folder = cache_folder(workdir, "teacher_maps")
    maps = np.load(folder / "teacher_map.npy")
    identity = json.loads((folder / "identity.json").read_text())
    assert identity["dataset"] == "synthetic_iqa/tiny"
    assert identity["shapes"] == {"teacher_map": list(maps.shape[1:])}
    scorer = dpiqa_jax.load(str(teacher))
    batches = eval_batches("synthetic_iqa/tiny", "official", batch_size=len(maps), part="train",
                           image_size=scorer.image_size, data_dir=str(train_root / "tfds"))
    batch = next(iter(batches))
    assert batch["mask"].all() and list(batch["index"]) == sorted(batch["index"])  # rows in index order
    expected = scorer.feature_maps(batch["image"])
    # float32, another batch size (8 per call here, 24 in the pass): measured 4e-6 of the maps' scale
    assert np.abs(maps - expected).max() <= 2e-5 * np.abs(expected).max() and expected.std() > 0


def test_without_cached_maps_distillation_batches_carry_the_teachers_vae_posteriors(smoke_run, train_root,
                                                                                    tmp_path, capfd):
    """`student.cache_teacher` off, `model.cache_posteriors` on (the authors' student configs): one
    pass of the teacher's frozen VAE caches the train images' posteriors, the very ones the
    teacher's own run cached, and the distillation batches carry them (the step's test is in
    test_train_step). With the teacher's workdir as `cache_dir`, its cache serves, without a pass."""
    from dpiqa_jax.train import distill, inputs, schedule
    from dpiqa_jax.train import mesh as mesh_lib
    from dpiqa_jax.train import state as state_lib
    from dpiqa_jax.train.config_util import apply_overrides, load_config
    from dpiqa_jax.train.loop import cache_root
    from dpiqa_jax.train.step import POSTERIOR

    config = load_config(STUDENT_SMOKE)
    apply_overrides(config, [("student.cache_teacher", "false"), ("model.latents", "sample"),
                             ("dataset.data_dir", str(train_root / "tfds"))])
    task = distill.student_task(config, str(smoke_run))
    assert set(task.joined) == set(POSTERIOR)
    mesh = mesh_lib.make_mesh(1)
    data = inputs.IQAData(config, task.image_size, mesh)
    tx = schedule.optimizer(config.optim, schedule.learning_rate(config.optim, 1, 1))
    _, shardings = state_lib.layout(task.param_shapes, tx, mesh)
    *_, step_inputs = task.compile_steps(tx, mesh, shardings)
    join = task.batch_join(data, cache_root(config, str(tmp_path)), None, step_inputs)
    ours, teachers = cache_folder(tmp_path, "vae_posteriors"), cache_folder(smoke_run, "vae_posteriors")
    # the wait before the first step is explained
    assert f"dpiqa-jax: {ours}: one pass over the {data.num_train} train examples" in capfd.readouterr().out

    assert ours.name == teachers.name  # made by the same VAE from the same images: the same key
    assert (ours / "identity.json").read_text() == (teachers / "identity.json").read_text()
    for name in POSTERIOR:
        cached = np.load(ours / f"{name}.npy")
        np.testing.assert_allclose(cached, np.load(teachers / f"{name}.npy"), rtol=1e-6, atol=1e-7)
        assert cached.shape[0] == data.num_train and np.std(cached) > 0
    backwards = {"index": data.train_indices[::-1].astype(np.int32)}
    want = np.load(ours / f"{POSTERIOR[0]}.npy")[::-1]
    np.testing.assert_array_equal(join(backwards)[POSTERIOR[0]], want)

    apply_overrides(config, [("cache_dir", str(smoke_run))])
    shared = task.batch_join(data, cache_root(config, str(tmp_path / "another_run")), None, step_inputs)
    assert "one pass" not in capfd.readouterr().out and not (tmp_path / "another_run").exists()
    np.testing.assert_allclose(shared(backwards)[POSTERIOR[0]], want, rtol=1e-6, atol=1e-7)
