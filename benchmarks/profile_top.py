"""Where a step's device time goes: the ops of a JAX profiler trace, grouped and ranked.

    python benchmarks/profile_top.py TRACE_DIR --steps N     # what `speed.py --profile` prints

Reads the Perfetto trace that `jax.profiler.trace(..., create_perfetto_trace=True)` writes under
TRACE_DIR. The ops are the events of the accelerator's processes (`/device:GPU:0`, a TPU's): on a
GPU the kernels, copies and collectives of its `Stream` lines; where it has none (a TPU), its `XLA
Ops` line (not `XLA Modules`, whose events span whole steps). On a CPU, which has no such process,
they are the events of XLA's executor threads, less the runtime's own (names with `::`,
`end: ...`). Each op's
name without its trailing number (`loop_add_fusion_12` -> `loop_add_fusion`) is its kind; the
table ranks kinds and single ops by time per step (the trace's total over N).
"""
import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Optional

NUMBERED = re.compile(r"[._]\d+$")  # `fusion.12`, `loop_add_fusion_12`; not `bf16`


def trace_file(folder: str) -> Path:
    """The newest Perfetto trace under `folder` (jax writes plugins/profile/DATE/perfetto_trace.json.gz)."""
    found = sorted(Path(folder).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{folder}: no perfetto_trace.json.gz (was the trace made with "
                                "create_perfetto_trace=True?)")
    return found[-1]


def device_ops(events: list[dict]) -> list[tuple[str, float]]:
    """(name, microseconds) of every op the device ran, as the module docstring says."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    line = lambda e: threads.get((e["pid"], e.get("tid")), "")
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        lines = [name for (pid, _), name in threads.items() if pid in devices]
        kept = next((start for start in ("Stream", "XLA Ops") if any(n.startswith(start) for n in lines)), "")
        chosen = [e for e in spans if e["pid"] in devices and line(e).startswith(kept)]
    else:
        chosen = [e for e in spans if line(e).startswith("tf_XLA") and "::" not in e["name"]
                  and not e["name"].startswith("end: ")]
    return [(e["name"], float(e["dur"])) for e in chosen]


def ranked(ops: list[tuple[str, float]], steps: int, key=lambda name: name) -> list[dict]:
    """Rows {op, ms_per_step, share, calls_per_step}, the longest first; `key` groups names."""
    time, calls = collections.Counter(), collections.Counter()
    for name, dur in ops:
        time[key(name)] += dur
        calls[key(name)] += 1
    total = sum(time.values()) or 1.0
    return [{"op": op, "ms_per_step": us / 1000 / steps, "share": us / total,
             "calls_per_step": calls[op] / steps} for op, us in time.most_common()]


def kind(name: str) -> str:
    return NUMBERED.sub("", name)


def report(folder: str, steps: int, top: int = 15, wall_s: Optional[float] = None) -> str:
    """Two markdown tables, the top op kinds and the top single ops, after the device's total per
    step and, given the traced steps' `wall_s`, the wall time per step: a device idle for much of
    it waits on the host (dispatch, input)."""
    with gzip.open(trace_file(folder), "rt") as f:
        ops = device_ops(json.load(f)["traceEvents"])
    total_ms = sum(dur for _, dur in ops) / 1000 / steps
    wall = "" if wall_s is None else f"; wall {wall_s * 1000 / steps:.1f} ms per step under the profiler"
    count = len(ops) / steps
    lines = [f"device time {total_ms:.1f} ms per step in {count:.0f} ops{wall} ({steps} steps traced)"]
    for title, rows in (("op kind", ranked(ops, steps, kind)), ("op", ranked(ops, steps))):
        lines += ["", f"| {title} | ms per step | share | calls per step |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['op'][:100]} | {r['ms_per_step']:.2f} | {r['share']:.1%} | {r['calls_per_step']:g} |"
                  for r in rows[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir", help="the folder given to jax.profiler.trace")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (the table is per step)")
    p.add_argument("--top", type=int, default=15, help="rows per table")
    args = p.parse_args(argv)
    print(report(args.trace_dir, args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
