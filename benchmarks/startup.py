"""Issue 7's startup figure: seconds from `dpiqa-jax train` to the end of its first step, as the
command itself prints it, with cold or warm caches.

    python benchmarks/startup.py OUT/start_cold.json --cache OUT/start_cache --cold   # emptied first
    python benchmarks/startup.py OUT/start_warm.json --cache OUT/start_cache          # then again
    python benchmarks/startup.py OUT/check.json --cache /tmp/c --config configs/demo.py:smoke  # CPU
    python benchmarks/startup.py OUT/start_sd.json --cache OUT/start_cache --sd-dir /tmp/sd15 --prime

The run is the full-size teacher of `--config` (default configs/default.py: SD-1.5, 512 px, batch
16) with random weights (no model files), or with `--sd-dir` the U-Net and VAE of a local
diffusers folder as a user's first run reads SD-1.5 (`random_sd.py` writes one of the real size),
on the built-in synthetic images, in a new workdir, with
JAX's compilation cache (and the stored train step beside it) and the per-image caches under
`--cache`: what a rerun with the same config finds, against what a first run finds. The run is
killed once its first step is done. No JAX in this process: the command has the device to itself.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
DATASET = "synthetic_iqa/tiny"  # built by dpiqa_jax from nothing: no download
FIRST_STEP = re.compile(r"first step done ([0-9.]+) s after the command started")
READ_BACK = "the train step's stored program"  # in that line where the start skipped the step's trace
DEVICE = re.compile(r"dpiqa-jax: [0-9]+ devices? \((.*?)\) in ")  # the run's own first line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", help="the result as JSON")
    p.add_argument("--cache", required=True, help="JAX's compilation cache and the per-image caches")
    p.add_argument("--cold", action="store_true", help="empty --cache first")
    p.add_argument("--config", default=str(REPO / "configs" / "default.py"))
    p.add_argument("--data-dir", help=f"where {DATASET} is prepared (default: --cache/tfds; not emptied)")
    p.add_argument("--limit", type=float, default=600, help="seconds before the command is given up")
    p.add_argument("--sd-dir", help="start from this diffusers folder's U-Net and VAE (model.sd_dir)")
    p.add_argument("--random-sd", action="store_true",
                   help="if --sd-dir holds no model, write random weights of the config's shapes there first "
                        "(random_sd.py; not timed)")
    p.add_argument("--prime", action="store_true",
                   help="run the command once before the timed run: the caches as a rerun with the same "
                        "weights finds them (with new --sd-dir weights, the first run makes the VAE's "
                        "posteriors and compiles the init of the other parts)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: the command goes with us
    cache = Path(args.cache).resolve()
    data_dir = Path(args.data_dir or cache.parent / "tfds").resolve()
    if args.cold:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache / "xla"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Prepared before the clock starts: a user's dataset is prepared once, long before.
    prepare = f"import dpiqa_jax.data.source as s; s.prepare({DATASET!r}, {str(data_dir)!r})"
    prepared = subprocess.run([sys.executable, "-c", prepare], env=env, capture_output=True, text=True)
    if prepared.returncode:
        print(f"startup: preparing {DATASET} failed:\n{prepared.stderr[-3000:]}", file=sys.stderr)
        return 1
    if args.random_sd and args.sd_dir and not (Path(args.sd_dir) / "unet" / "config.json").exists():
        written = subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_sd.py"), args.sd_dir,
                                  "--config", args.config], env=env, capture_output=True, text=True)
        if written.returncode:
            print(f"startup: writing {args.sd_dir} failed:\n{written.stderr[-3000:]}", file=sys.stderr)
            return 1
    starts = []  # (seconds, output) of each run of the command: the priming one first
    for _ in range(1 + args.prime):
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix="startup_workdir_") as workdir:
            command = train_command(args.config, workdir, data_dir, cache, args.sd_dir)
            starts.append(first_step(command, env, args.limit))
        if starts[-1][0] is None:  # failed: reported below with its output
            break
    seconds, log = starts[-1]
    device = DEVICE.search(log)
    device = device.group(1) if device else None
    read_back = READ_BACK in log
    result = {"config": args.config, "cold": args.cold, "sd_dir": args.sd_dir, "first_step_s": seconds,
              "primed_first_step_s": starts[0][0] if args.prime else None, "stored_step": read_back,
              "device": device,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    if seconds is None:
        print(f"startup: no first step (the command failed or ran past {args.limit:.0f} s); its output "
              f"ends:\n{log[-3000:]}", file=sys.stderr)
        return 1
    caches = "cold" if args.cold else "warm"
    weights = f", U-Net and VAE from {args.sd_dir}" if args.sd_dir else ""
    primed = f"; after a first run of {starts[0][0]:.1f} s" if args.prime else ""
    stored = ", the train step's stored program" if read_back else ""
    print(f"command to first step: {seconds:.1f} s ({caches} caches{stored}, {device}{weights}{primed})")
    return 0


def train_command(config: str, workdir: str, data_dir: Path, cache: Path, sd_dir: Optional[str]) -> list[str]:
    overrides = {"dataset.name": DATASET, "dataset.manual_dir": "none", "dataset.data_dir": data_dir,
                 "dataset.split": "official", "model.sd_dir": sd_dir or "none", "model.embeddings": "none",
                 "model.init_from": "none", "cache_dir": cache / "examples", "num_steps": 100_000,
                 "eval.every": 100_000, "checkpoint.every": 100_000}
    return [sys.executable, "-m", "dpiqa_jax.cli", "train", "--config", config, "--workdir", workdir,
            *(f"--config.{key}={value}" for key, value in overrides.items())]


def first_step(command: list[str], env: dict, limit: float) -> tuple:
    """(the seconds the command printed for its first step, or None if it failed or ran past
    `limit`; its output so far). The command is killed then, with all it started."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    watchdog = threading.Timer(limit, os.killpg, (process.pid, signal.SIGKILL))  # ends the read below
    watchdog.start()
    lines, seconds = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            found = FIRST_STEP.search(line)
            if found:
                seconds = float(found.group(1))
                break
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):  # no evaluation, no checkpoint: the figure is taken
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return seconds, "".join(lines)


if __name__ == "__main__":
    sys.exit(main())
