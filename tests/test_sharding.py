"""Sharding: the FSDP rule, the step on meshes of 8 simulated CPU devices, and `demo.py:smoke`
giving the same losses and metrics on 1 device and as 2 processes of 2 devices with FSDP, stopped
and resumed across them."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import (
    REPO,
    RTOL,
    assert_same_run,
    cache_folder,
    check,
    environment,
    error_line,
    free_port,
    run,
    run_line,
    start_processes,
    stop_processes_with_sigterm,
    train_command,
)

from dpiqa_jax.train.mesh import fsdp_spec

pytest_plugins = ("train_fixtures",)  # the session fixtures train_root and smoke_run


@pytest.mark.parametrize("shape, size, spec", [
    ((320, 640, 3, 3), 8, (None, "fsdp", None, None)),  # the largest divisible dimension
    ((3, 3, 4, 320), 8, (None, None, None, "fsdp")),
    ((768,), 8, ("fsdp",)),
    ((1485, 7), 8, ()),  # nothing divisible: replicated
    ((), 8, ()),
    ((320, 640), 1, ()),  # no fsdp axis
    ((640, 640), 4, ("fsdp", None)),  # ties: the first
])
def test_fsdp_spec_cuts_the_largest_divisible_dimension(shape, size, spec):
    assert tuple(fsdp_spec(shape, size)) == spec


def test_step_on_8_devices_matches_1_device(tmp_path):
    """The stand-in teacher's steps (sampled latents, ranking loss) on 1 device, data-parallel over
    8, FSDP over 8, and 2 x 4: same losses and parameters; FSDP shards params and Adam moments."""
    env = environment(tmp_path, devices=8)
    result = subprocess.run([sys.executable, "sharding_script.py"], env=env, cwd=REPO / "tests",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout)
    one = runs.pop("one")
    for name, other in runs.items():
        for a, b in zip(one["losses"], other["losses"], strict=True):
            assert math.isclose(a, b, rel_tol=RTOL), (name, one["losses"], other["losses"])
        np.testing.assert_allclose(other["body"], one["body"], rtol=RTOL, atol=1e-6, err_msg=name)
    assert runs["data8"]["body_spec"] == "P()"
    for name in ("fsdp8", "data2_fsdp4"):
        assert "fsdp" in runs[name]["body_spec"] and "fsdp" in runs[name]["mu_spec"], runs[name]
        assert "fsdp" in runs[name]["vae_spec"]


# The 1-device reference is asked for after the run, so that under pytest-xdist the runs of
# different workers overlap instead of queueing behind it.


@pytest.mark.slow
def test_a_2_process_run_matches_1_device_and_resumes_on_1_device_after_sigterm(train_root, tmp_path,
                                                                                 request):
    """Two jax.distributed processes on localhost (gloo collectives) with two devices each, as a
    2 (data) x 2 (fsdp) mesh: multi-host, data parallelism and FSDP at once; each process reads its
    half of every batch, params and Adam state are sharded. Its losses and first evaluation are the
    1-device run's. Then it is preempted (SIGTERM to process 1): both processes save one step and
    exit with 143, and the same command on one device (another number of hosts and another mesh)
    resumes from that step and ends as the uninterrupted run."""
    workdir = tmp_path / "run"
    outs, step = stop_processes_with_sigterm(train_command(workdir, train_root, "--config.mesh.fsdp=2"),
                                             environment(train_root, devices=2), workdir, split="test")
    # Process 0 says that both processes and their 4 devices joined; process 1 prints no status.
    assert run_line(outs[0]).startswith("dpiqa-jax: 4 devices (cpu) in 2 processes, mesh data 2 x "
                                        "fsdp 2; batch 16 (4 per device)"), outs[0][:1000]
    assert "dpiqa-jax:" not in outs[1]
    assert 6 <= step < 12, step
    rerun = check(run(train_command(workdir, train_root), environment(train_root)))
    said = rerun.stdout.splitlines()[0]
    assert said.startswith("dpiqa-jax: 1 device (cpu) in 1 process, mesh data 1 x fsdp 1; "), said
    assert said.endswith(f"resuming after step {step}"), said
    reference = request.getfixturevalue("smoke_run")
    assert_same_run(reference, workdir, until=6)  # the 2 processes' windows and evaluation
    assert_same_run(reference, workdir, after=step)  # after the resume on 1 device
    # the VAE's digest does not depend on the mesh: a cache_dir shared with 1-device runs serves both
    assert cache_folder(workdir, "vae_posteriors").name == cache_folder(reference, "vae_posteriors").name


@pytest.mark.slow
@pytest.mark.warm  # the 2 x 2 FSDP run's programs: NaN prompts change values, not programs
def test_a_nan_loss_stops_both_processes_with_the_one_line(train_root, tmp_path):
    """Every process sees the same non-finite step (the metrics are global): both stop with the one
    line and exit code 2, nothing saved."""
    np.save(tmp_path / "nan.npy", np.full((64, 32), np.nan, np.float32))  # demo.py's prompt matrix shape
    workdir = tmp_path / "nan"
    procs = start_processes(train_command(workdir, train_root, "--config.mesh.fsdp=2",
                                          f"--config.model.embeddings={tmp_path / 'nan.npy'}"),
                            environment(train_root, devices=2))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [e[-2000:] for e in errors]
    for e in errors:
        assert error_line(e, "train").startswith("non-finite loss and grad_norm at step 1: training stopped")
    assert not [p for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit()]


def test_a_process_that_fails_stops_the_other_instead_of_hanging(train_root, tmp_path):
    """Process 1 fails at start (its dataset folder is empty) while process 0 goes on and waits in
    the first collective: process 1 exits at once with its one-line error, and the coordination
    service stops process 0 once process 1's heartbeats stop, instead of both hanging."""
    port, timeout = free_port(), 5
    env = environment(train_root, devices=1)
    procs = [subprocess.Popen(
        train_command(tmp_path / "run", train_root if i == 0 else tmp_path / "empty") + [
            "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
            "--heartbeat-timeout", str(timeout)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 2, errors[1][-2000:]
    assert errors[1].strip().splitlines()[-1].startswith("dpiqa-jax train: error: synthetic_iqa/tiny")
    assert "is not prepared" in errors[1]
    assert procs[0].returncode != 0, errors[0][-2000:]
