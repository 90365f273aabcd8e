"""benchmarks/attention_kernels.py: the attention kernels on the U-Net's shapes, each checked against
XLA's in float32 and timed. Here with the Pallas TPU kernel in interpret mode as the fused one
(cuDNN's needs an NVIDIA GPU), on small shapes."""
import json
import sys

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from train_helpers import REPO

from dpiqa_jax.models import attention

sys.path.insert(0, str(REPO / "benchmarks"))
import attention_kernels as bench  # noqa: E402

# 128 px: 16 x 16 latents, whose 256 queries fill the Pallas kernel's blocks; the deeper levels' do not.
RUN = ["--size", "128", "--batch", "1", "--prompts", "77", "--kernels", "xla", "tpu_flash",
       "--steps", "1", "--warmup", "0"]


def test_sd15_shapes_are_its_sixteen_transformers():
    shapes = {s.name: s for s in bench.unet_shapes(512, 1485)}
    assert sum(s.per_pass for s in shapes.values() if s.name.endswith("self")) == 16
    assert [(s.queries, s.heads, s.dim, s.per_pass) for s in shapes.values() if s.name.endswith("cross")] == [
        (4096, 8, 40, 5), (1024, 8, 80, 5), (256, 8, 160, 5), (64, 8, 160, 1)]
    assert {s.keys for s in shapes.values() if s.name.endswith("cross")} == {1485}
    assert shapes["64x64 9 keys (mask check)"].keys % 2 == 1


def run(tmp_path, capsys) -> tuple[int, dict, str]:
    with pltpu.force_tpu_interpret_mode():
        code = bench.main(RUN + ["--output", str(tmp_path / "attention.json")])
    return code, json.loads((tmp_path / "attention.json").read_text()), capsys.readouterr().out


def test_each_kernel_is_checked_and_timed_on_each_shape(tmp_path, capsys):
    code, report, table = run(tmp_path, capsys)
    assert code == 0, table
    rows = {(r["shape"], r["kernel"]): r for r in report["rows"]}
    flash = sorted(shape for shape, kernel in rows if kernel == "tpu_flash")
    assert flash == ["16x16 9 keys (mask check)", "16x16 cross", "16x16 self"]  # whole blocks only
    assert len(rows) == 9 + 3
    for r in rows.values():
        assert r["ok"] and r["ms"] > 0 and 0 < r["error"] < bench.TOL, r
    assert "| 16x16 cross | tpu_flash |" in table
    # The model's pass: Pallas' kernel on the first level, XLA's on the others.
    per_pass = lambda kernel, shape: rows[(shape, kernel)]["ms"] * rows[(shape, kernel)]["per_pass"]  # noqa: E731
    shapes = {shape for shape, _ in rows}
    flash_pass = sum(per_pass("tpu_flash" if s in flash else "xla", s) for s in shapes)
    assert f"tpu_flash: {flash_pass:.1f} ms of attention per U-Net pass" in table
    assert f"xla: {sum(per_pass('xla', s) for s in shapes):.1f} ms" in table


def test_a_kernel_that_lets_padded_keys_in_fails(tmp_path, capsys, monkeypatch):
    """The bug the mask check is for: keys padded with zeros but left in the softmax."""
    def unmasked(q, k, v):
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))  # noqa: E731
        return attention.jax.nn.dot_product_attention(q, pad(k), pad(v), implementation="xla")

    monkeypatch.setattr(attention, "tpu_flash_attention", unmasked)
    code, report, table = run(tmp_path, capsys)
    assert code == 1
    bad = {r["shape"] for r in report["rows"] if not r["ok"]}
    assert "16x16 9 keys (mask check)" in bad, table
    assert all(r["ok"] for r in report["rows"] if r["kernel"] == "xla")
