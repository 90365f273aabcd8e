"""benchmarks/profile_top.py: a trace's device ops, grouped by kind and ranked per step, from the
accelerator's processes where the trace has them and from XLA's CPU threads where it has not."""
import gzip
import json
import sys

import pytest
from train_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import profile_top  # noqa: E402


def meta(kind: str, pid: int, name: str, tid=None) -> dict:
    event = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
    return event if tid is None else event | {"tid": tid}


def span(pid: int, tid: int, name: str, dur: float) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name}


HOST = [meta("process_name", 1, "/host:CPU"), meta("thread_name", 1, "python", 10),
        meta("thread_name", 1, "tf_XLAPjRtCpuClient/7", 11),
        span(1, 10, "PjitFunction(step)", 9000.0), span(1, 11, "ThunkExecutor::Execute", 8000.0),
        span(1, 11, "loop_add_fusion.3", 400.0), span(1, 11, "end: loop_add_fusion.3", 1.0)]
GPU = [meta("process_name", 2, "/device:GPU:0"), meta("thread_name", 2, "Stream #13(Compute)", 20),
       meta("thread_name", 2, "XLA Modules", 21), meta("thread_name", 2, "XLA Ops", 22),
       span(2, 20, "loop_add_fusion_12", 300.0), span(2, 20, "loop_add_fusion_7", 100.0),
       span(2, 20, "sm90_xmma_gemm_bf16", 1200.0), span(2, 20, "sm90_xmma_gemm_bf16", 400.0),
       span(2, 21, "jit_step(1)", 2100.0), span(2, 22, "fusion.12", 300.0)]  # the same time, other lines
TPU = [meta("process_name", 3, "/device:TPU:0"), meta("thread_name", 3, "XLA Modules", 30),
       meta("thread_name", 3, "XLA Ops", 31), span(3, 30, "jit_step(1)", 900.0),
       span(3, 31, "convolution.4", 700.0), span(3, 31, "fusion.2", 150.0)]


def test_on_an_accelerator_only_its_ops_count():
    ops = profile_top.device_ops(HOST + GPU)
    assert sorted(ops) == sorted([("loop_add_fusion_12", 300.0), ("loop_add_fusion_7", 100.0),
                                  ("sm90_xmma_gemm_bf16", 1200.0), ("sm90_xmma_gemm_bf16", 400.0)])
    rows = profile_top.ranked(ops, steps=2, key=profile_top.kind)
    assert [r["op"] for r in rows] == ["sm90_xmma_gemm_bf16", "loop_add_fusion"]
    assert rows[0] == {"op": "sm90_xmma_gemm_bf16", "ms_per_step": 0.8, "share": 0.8, "calls_per_step": 1.0}
    assert rows[1]["ms_per_step"] == pytest.approx(0.2) and rows[1]["calls_per_step"] == 1.0


def test_on_a_tpu_the_ops_of_its_xla_ops_line():
    assert profile_top.device_ops(HOST + TPU) == [("convolution.4", 700.0), ("fusion.2", 150.0)]


def test_on_a_cpu_the_ops_of_xlas_threads_without_the_runtimes_own():
    assert profile_top.device_ops(HOST) == [("loop_add_fusion.3", 400.0)]
    kinds = {profile_top.kind(name) for name in ("loop_add_fusion.3", "loop_add_fusion_12")}
    assert kinds == {"loop_add_fusion"} and profile_top.kind("gemm_bf16") == "gemm_bf16"


def test_the_report_reads_the_newest_trace_under_the_folder(tmp_path):
    folder = tmp_path / "plugins" / "profile" / "2026_12_07"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": HOST + GPU}, f)
    text = profile_top.report(str(tmp_path), steps=2, top=1)
    assert text.splitlines()[0] == "device time 1.0 ms per step in 2 ops (2 steps traced)"
    assert profile_top.report(str(tmp_path), steps=2, wall_s=0.003).splitlines()[0] == (
        "device time 1.0 ms per step in 2 ops; wall 1.5 ms per step under the profiler (2 steps traced)")
    assert "| sm90_xmma_gemm_bf16 | 0.80 | 80.0% | 1 |" in text
    assert "loop_add_fusion" not in text  # one row per table
    with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz"):
        profile_top.report(str(tmp_path / "plugins" / "nothing"), steps=1)
