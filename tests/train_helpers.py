"""Running `dpiqa-jax train` as users do, in subprocesses, for the training tests.

Compiling the tiny teacher dominates these tests, so every subprocess shares one JAX compilation
cache (see train_fixtures.py for what else is made once per session)."""
import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "demo.py") + ":smoke"


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def shared_root(tmp_path_factory) -> Path:
    """A folder shared by every xdist worker of this session."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "train_shared"


# XLA:CPU flags of the test process (conftest.py) and its subprocesses alike, since the kernels
# differ in the last bits and tests compare numbers computed here with those of subprocesses.
# Optimisation level 0: compiling dominates the tests on tiny models (the tiny teacher's gradient:
# 35 s, 22 s at level 0; it then runs in 0.22 s instead of 0.11). No YNNPACK fusions: XLA:CPU
# rebuilds them slowly when it reads an executable back from the compilation cache (the smoke
# train step: 16.8 s with them, 6-7 s without; compiling alike).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_experimental_ynn_fusion_type="


def environment(root: Path, devices: int = 1) -> dict:
    flags = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), TF_CPP_MIN_LOG_LEVEL="3")


CLI = [sys.executable, "-m", "dpiqa_jax.cli"]  # `dpiqa-jax` in a fresh interpreter


def train_command(workdir: Path, root: Path, *overrides: str) -> list[str]:
    return CLI + ["train", "--config", SMOKE, "--workdir", str(workdir),
                  f"--config.dataset.data_dir={root / 'tfds'}", *overrides]


def run(command: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stop_with_sigterm(command: list[str], env: dict, workdir: Path, name: str = "train") -> tuple[str, int]:
    """`dpiqa-jax NAME` (`command`) sent SIGTERM once its first train record is written (a preempted
    machine): it exits with 143 and one line naming the step it saved. (its stdout, that step)."""
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_first_record(process, workdir, "train", lambda: process.stderr.read())
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    step = saved_step(last, workdir)
    assert last == (f"dpiqa-jax {name}: stopped by SIGTERM after step {step}, which is saved: run the same "
                    f"command again to resume")
    return stdout, step


def stop_processes_with_sigterm(command: list[str], env: dict, workdir: Path, name: str = "train",
                                split: str = "train") -> tuple[list[str], int]:
    """`command` as 2 jax.distributed processes, preempted once its first record of `split` is
    written: SIGTERM to process 1, and both save one step and exit with 143, each with the same last
    line. Process 1 is paused as process 0 says it stopped: were process 0 to exit without waiting
    for it (it hosts the coordination service), process 1 would abort (134) once resumed, as it
    sometimes did when it lagged behind process 0. (each process's stdout, the step saved)."""
    procs = start_processes(command, env)
    outs, errs, stopped = [[], []], [[], []], threading.Event()
    readers = [follow(p.stdout, outs[i]) for i, p in enumerate(procs)] + [
        follow(procs[0].stderr, errs[0], "stopped by SIGTERM", stopped), follow(procs[1].stderr, errs[1])]
    try:
        wait_for_first_record(procs[1], workdir, split, lambda: "".join(errs[1]))
        procs[1].send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=300), "".join(errs[0])[-2000:]
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(2)
        procs[1].send_signal(signal.SIGCONT)
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
        for thread in readers:
            thread.join()
    errors = ["".join(lines) for lines in errs]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errors]
    lasts = [[line for line in e.splitlines() if line.startswith(f"dpiqa-jax {name}: stopped by SIGTERM")]
             for e in errors]  # before jax.distributed's lines of its shutdown
    assert len(lasts[0]) == 1 and lasts[1] == lasts[0], lasts
    return ["".join(lines) for lines in outs], saved_step(lasts[0][0], workdir)


def wait_for_first_record(process: subprocess.Popen, workdir: Path, split: str, stderr) -> None:
    """Until `workdir` holds its first record of `split`; `process` must still run then (`stderr()`:
    its error output so far, for the message if it does not)."""
    deadline = time.time() + 600
    while not records_or_none(workdir, split) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before SIGTERM: " + stderr()[-2000:]


def saved_step(line: str, workdir: Path) -> int:
    """The step a run's 'stopped by SIGTERM after step N' line names: saved as the latest
    checkpoint, and the run not finished."""
    step = int(line.split("after step ")[1].split(",")[0])
    assert (workdir / "checkpoints" / "latest" / str(step)).is_dir(), step
    assert not (workdir / "results.json").exists()
    return step


def follow(stream, lines: list, marker: str = "", seen: threading.Event = None) -> threading.Thread:
    """A started thread that appends `stream`'s lines to `lines`, and sets `seen` at `marker`'s line."""
    def read():
        for line in stream:
            lines.append(line)
            if marker and marker in line:
                seen.set()
    thread = threading.Thread(target=read)
    thread.start()
    return thread


FIT = ("plcc_logistic", "rmse_logistic")  # the 4-parameter logistic fit's metrics


def assert_same_results(workdir: Path, reference: Path):
    """results.json equal, but for the 4-parameter logistic fit: on 8 images it is ill-posed, and
    runs whose scores agree in every other metric to the last bit have ended in different optima
    (rmse_logistic 0.1298 vs 0.1276; plcc_logistic equal). Issue 4 notes it as open."""
    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in FIT}
        return tree

    got, ref = results(workdir), results(reference)
    assert strip(got) == strip(ref)
    assert math.isclose(got["final"]["metrics"]["plcc_logistic"], ref["final"]["metrics"]["plcc_logistic"],
                        rel_tol=1e-6)


def assert_resumed_as(workdir: Path, reference: Path):
    """A run stopped after its first log window and resumed ends as `reference`: its results, every
    evaluation and the log windows after step 6 (a window the stop cut is logged in part before, in
    part after) to the last bit."""
    assert_same_results(workdir, reference)
    assert without_fit(records(workdir, "test")) == without_fit(records(reference, "test"))
    later = lambda rows: [r for r in without_clock(rows) if r["step"] > 6]  # noqa: E731 (full windows)
    assert later(records(workdir, "train")) == later(records(reference, "train"))


def without_fit(rows: list[dict], dropped=FIT) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in dropped} for r in rows]


def without_clock(rows: list[dict]) -> list[dict]:
    return without_fit(rows, FIT + ("images_per_second",))


def start_processes(command: list[str], env: dict, count: int = 2) -> list[subprocess.Popen]:
    """`command` as `count` jax.distributed processes on localhost."""
    port = free_port()
    return [subprocess.Popen(command + ["--coordinator", f"localhost:{port}", "--num-processes", str(count),
                                        "--process-id", str(i)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(count)]


def finish(procs: list[subprocess.Popen], timeout: int = 900) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr), once all have ended, each with exit code 0."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(
        f"process {i}: {err[-2000:]}" for i, (_, err) in enumerate(outputs))
    return outputs


def run_line(stdout: str) -> str:
    """The run's first status line (`dpiqa-jax: N devices ...`), after anything Gloo prints first."""
    return next(line for line in stdout.splitlines() if line.startswith("dpiqa-jax: "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def records(workdir: Path, split: str) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def records_or_none(workdir: Path, split: str = "train") -> list[str] | bool:
    """The records of `split` written so far (none while the file does not exist yet)."""
    path = workdir / "metrics.jsonl"
    return path.is_file() and [line for line in path.read_text().splitlines() if f'"{split}"' in line]


def results(workdir: Path) -> dict:
    with open(workdir / "results.json") as f:
        return json.load(f)


RTOL = 1e-4  # runs on 8 devices, with FSDP or as 2 processes agree with 1 device to this


def assert_same_run(reference: Path, other: Path, after: int = 0, until: int = 1 << 30,
                    losses=("loss", "mse", "grad_norm"), metrics=("srcc", "plcc", "krcc", "rmse")):
    """Every logged train step's `losses` and every evaluation's `metrics` up to step `until`, within
    RTOL. With `after` (a step the run stopped after), only the evaluations after it and the train
    windows that start after it: a window cut by a stop is logged in part before, in part after."""
    for split, names in (("train", losses), ("test", metrics)):
        ref, got = ([r for r in records(run, split) if r["step"] <= until] for run in (reference, other))
        if after:
            first = after + (ref[1]["step"] - ref[0]["step"] if split == "train" else 1)  # log_every
            ref, got = ([r for r in rows if r["step"] >= first] for rows in (ref, got))
        assert [r["step"] for r in ref] == [r["step"] for r in got]
        for a, b in zip(ref, got, strict=True):
            for name in names:
                close = math.isclose(a[name], b[name], rel_tol=RTOL, abs_tol=1e-6)
                assert close, (split, a["step"], name, a[name], b[name])
    assert results(reference)["best"]["srcc"]["step"] == results(other)["best"]["srcc"]["step"]


def cache_folder(root: Path, kind: str) -> Path:
    """The one complete per-example cache of `kind` ('vae_posteriors', 'teacher_maps') under `root`
    (a workdir or a config's cache_dir)."""
    folders = [path.parent for path in (root / kind).glob("*/identity.json")]
    assert len(folders) == 1, folders
    return folders[0]


def error_line(stderr: str, command: str) -> str:
    """The one error line of a failed `dpiqa-jax COMMAND`. Orbax's and tensorstore's threads may
    still print tracebacks (of the reads or writes cut short) around it, even mid-line."""
    marker = f"dpiqa-jax {command}: error: "
    assert stderr.count(marker) == 1, stderr[-3000:]
    return stderr[stderr.index(marker) + len(marker):].split("\n")[0]
