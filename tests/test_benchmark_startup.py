"""benchmarks/startup.py run as gpu_table.sh runs it, on the CPU with the demo's tiny teacher: the
command's own first-step figure reported, the caches where it says, and nothing left running; then
the warm start from a local SD folder of random weights that it writes first (random_sd.py), after
a first run from them."""
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
    report, stdout = start(train_root, tmp_path / "cold.json", cache, "--cold")
    assert report["cold"] and report["device"] == "cpu" and 0 < report["first_step_s"] < 300
    assert not report["stored_step"]  # traced, then stored
    assert f"command to first step: {report['first_step_s']:.1f} s (cold caches, cpu)" in stdout
    assert not (cache / "stale").exists()
    assert list((cache / "xla" / "dpiqa_steps").glob("*.bin"))  # the stored step, for a warm start
    assert list((cache / "examples" / "vae_posteriors").glob("*/identity.json"))
    assert not list(tmp_path.glob("startup_workdir_*"))  # the run's workdir is gone
    assert not running_with(str(cache))  # the command and all it started were killed

    sd = tmp_path / "sd"
    options = ("--sd-dir", str(sd), "--random-sd", "--prime")
    report, stdout = start(train_root, tmp_path / "sd.json", cache, *options)
    assert not report["cold"] and report["sd_dir"] == str(sd)
    assert report["stored_step"]  # the cold start's: the weights' folder is not in the step's key
    seconds, primed = report["first_step_s"], report["primed_first_step_s"]
    assert 0 < seconds < 300 and 0 < primed < 300
    assert (f"command to first step: {seconds:.1f} s (warm caches, the train step's stored program, cpu, "
            f"U-Net and VAE from {sd}; after a first run of {primed:.1f} s)") in stdout
    assert (sd / "unet" / "config.json").exists() and (sd / "vae" / "config.json").exists()
    # the folder's VAE, not the random one of the cold start: posteriors of its own
    assert len(list((cache / "examples" / "vae_posteriors").glob("*/identity.json"))) == 2
    assert not running_with(str(cache))


def start(train_root, output, cache, *options) -> tuple[dict, str]:
    """(the report startup.py wrote, its output) for the demo's smoke teacher; it must succeed."""
    config = str(REPO / "configs" / "demo.py") + ":smoke"
    command = [sys.executable, "benchmarks/startup.py", str(output), "--cache", str(cache),
               "--config", config, "--data-dir", str(train_root / "tfds"), "--limit", "300", *options]
    result = subprocess.run(command, cwd=REPO, env=environment(train_root), capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout


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
