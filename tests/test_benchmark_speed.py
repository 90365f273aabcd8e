"""benchmarks/speed.py run as a user runs it, on the CPU with the demo's tiny models: the jobs
measured on both sides, the table and JSON built from those figures, and the two sides' scores
equal on the same images (float32), which shows the baseline computes our function. The U-Net and
distillation jobs are left out to keep the suite in its time budget (each compiles for ~25 s on two
cores): run `python benchmarks/speed.py --tiny` before spending GPU time on them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import REPO

# Like the trainer's end-to-end runs, it compiles the tiny teacher's steps (about a minute).
pytestmark = pytest.mark.slow

JOBS = ["teacher_train", "teacher_infer", "student_infer"]
INFERENCE = ("teacher_infer", "student_infer")
SCORE_TOL = 2e-5  # float32 on both sides; measured 1e-6 (teacher) and 5e-6 (student, ~60 batch norms)


def run_benchmark(out, jobs=JOBS, *options: str) -> subprocess.CompletedProcess:
    # Optimisation level 0 halves XLA's compile time on the CPU; this run checks the script, not speed.
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    command = [sys.executable, "benchmarks/speed.py", "--tiny", "--batch", "4", "--steps", "2",
               "--warmup", "1", "--jobs", *jobs, "--output", str(out), *options]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_run_measures_every_job_on_both_sides_with_equal_scores(tmp_path):
    """One run only (it compiles three steps): every check on its output is here."""
    result = run_benchmark(tmp_path / "speed.json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert (report["batch"], report["image_size"], report["steps"], report["warmup"]) == (4, 64, 2, 1)
    assert report["dtype"] == {"ours": "float32", "ours_params": "float32", "baseline": "float32"}
    assert report["device"]["jax"] == "cpu" and report["device"]["torch"] == "cpu"
    assert {"jax", "torch", "diffusers"} <= set(report["versions"]) and report["date"]
    assert [row["job"] for row in report["jobs"]] == JOBS

    for row in report["jobs"]:
        ours, baseline = row["ours"], row["baseline"]
        assert "error" not in ours and "error" not in baseline, row
        assert ours["images_per_s"] > 0 and baseline["images_per_s"] > 0 and ours["compile_s"] > 0
        assert row["ratio"] == pytest.approx(ours["images_per_s"] / baseline["images_per_s"], rel=1e-12)
        assert ours["peak_bytes"] is None and baseline["peak_bytes"] is None  # the CPU keeps no peak
        line = (f"| {row['title']} | {ours['images_per_s']:.2f} | {baseline['images_per_s']:.2f} | "
                f"{row['ratio']:.2f} |")
        assert line in result.stdout, line
        if row["job"] in INFERENCE:
            check_scores(row)
        else:
            assert row["score_rel_diff"] is None
    assert result.stdout.count("\n| ") == 2 + len(JOBS)  # header, rule, one row per job


def check_scores(row: dict) -> None:
    """Both sides' scores of the same 4 images: equal, and different from image to image (a parity
    check of constants would prove nothing)."""
    ours, baseline = (np.asarray(row[side]["scores"], np.float64) for side in ("ours", "baseline"))
    assert ours.shape == baseline.shape == (4,)
    assert row["score_rel_diff"] == pytest.approx(np.linalg.norm(ours - baseline) / np.linalg.norm(baseline))
    assert row["score_rel_diff"] < SCORE_TOL
    assert np.ptp(baseline) > 0.02 * np.abs(baseline).max()


def test_profile_says_where_the_device_time_of_the_steps_goes(tmp_path):
    """--profile: after the timed steps, as many more traced; the device ops of those steps ranked."""
    result = run_benchmark(tmp_path / "speed.json", ["student_infer"], "--no-baseline", "--profile",
                           str(tmp_path / "profile"))
    assert result.returncode == 0, result.stderr[-3000:]
    where = (tmp_path / "profile" / "student_infer.md").read_text()
    assert f"student_infer, where the device time goes:\n{where}" in result.stderr
    first, _, header, rule, *rows = where.splitlines()[:9]
    words = first.split()
    assert first.startswith("device time ") and first.endswith(" under the profiler (2 steps traced)"), first
    assert float(words[2]) > 0 and float(words[words.index("wall") + 1]) > 0, first
    assert header.startswith("| op kind | ms per step |")
    shares = [float(row.split(" | ")[2].rstrip("%")) for row in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.1, where
