"""benchmarks/startup.py run as gpu_table.sh runs it, on the CPU with the demo's tiny teacher: the
command's own first-step figure reported, the caches where it says, and nothing left running."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, environment

pytest_plugins = ("train_fixtures",)  # the session fixture train_root (synthetic_iqa/tiny prepared)
pytestmark = pytest.mark.slow  # one cold compile of the tiny train step


def test_a_cold_start_reports_the_commands_first_step_and_leaves_nothing_running(train_root, tmp_path):
    cache = tmp_path / "start_cache"
    (cache / "stale").mkdir(parents=True)  # --cold empties the folder
    command = [sys.executable, "benchmarks/startup.py", str(tmp_path / "cold.json"), "--cache", str(cache),
               "--cold", "--config", str(REPO / "configs" / "demo.py") + ":smoke",
               "--data-dir", str(train_root / "tfds"), "--limit", "300"]
    result = subprocess.run(command, cwd=REPO, env=environment(train_root), capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "cold.json").read_text())
    assert report["cold"] and report["device"] == "cpu" and 0 < report["first_step_s"] < 300
    assert f"command to first step: {report['first_step_s']:.1f} s (cold caches, cpu)" in result.stdout
    assert not (cache / "stale").exists()
    assert list((cache / "xla" / "dpiqa_steps").glob("*.bin"))  # the stored step, for a warm start
    assert list((cache / "examples" / "vae_posteriors").glob("*/identity.json"))
    assert not list(tmp_path.glob("startup_workdir_*"))  # the run's workdir is gone
    assert not running_with(str(cache))  # the command and all it started were killed


def running_with(text: str) -> list[str]:
    """The command lines of this machine's other processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if text in args:
            found.append(args)
    return found
