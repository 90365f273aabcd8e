"""The attention kernels on the U-Net's shapes: each fused kernel's output and gradients against
XLA's, and the time of each, on whatever device JAX sees.

    python benchmarks/attention_kernels.py                       # SD-1.5 at 512 px, batch 16
    python benchmarks/attention_kernels.py --size 64 --batch 2   # quick (on a CPU: XLA's kernel only)

The kernels are the model's (`attend`, dpiqa_jax/models/attention.py): XLA's, and the device's fused
one (cuDNN on a GPU, Pallas on a TPU; `--kernels` to choose). The rows are the U-Net's attentions
at each level (SD-1.5's channels and heads): self-attention, cross-attention on the prompts (a
batch-1 context broadcast to the batch, as the model does), and at the first level a short odd
context, where keys a kernel pads but fails to mask would show (cuDNN's training path takes an odd
number of keys only padded by one). Each row times the forward and backward pass (a VJP) in
bfloat16; its error is the largest relative L2 error of the output and the three gradients against
XLA's kernel in float32 on the same inputs. `per pass` weights a row by its count in one U-Net
pass. A kernel that fails or errs by more than TOL exits 1: run this first on a new card.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from speed import measure  # beside this script

from dpiqa_jax.models.attention import attend, choose
from dpiqa_jax.models.unet import CROSS_DOWN, CROSS_UP, UNetConfig

TOL = 2e-2  # bfloat16 inputs and outputs: XLA's own bfloat16 error is about 2.4e-3 (its rows)
CHECK_KEYS = 9  # the short odd context: one unmasked zero key would move its outputs by about 10 %


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    queries: int
    keys: int
    heads: int
    dim: int
    per_pass: int  # attentions of this shape in one U-Net pass
    shared_context: bool  # keys and values from a batch-1 context


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (the latents' is 1/8)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompts", type=int, default=1485, help="keys of the cross-attention (DP-IQA's prompts)")
    p.add_argument("--kernels", nargs="+", help="default: 'xla' and the device's fused kernel")
    p.add_argument("--steps", type=int, default=10, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output", help="write the rows as JSON here")
    return p.parse_args(argv)


def unet_shapes(size: int, prompts: int) -> list[Shape]:
    """The attention shapes of one pass of SD-1.5's U-Net at `size` px, level by level."""
    unet = UNetConfig()
    n, heads = len(unet.block_out_channels), unet.heads()
    shapes = []
    for level, channels in enumerate(unet.block_out_channels):
        count = (unet.layers_per_block * (unet.down_block_types[level] == CROSS_DOWN)
                 + (unet.layers_per_block + 1) * (unet.up_block_types[n - 1 - level] == CROSS_UP)
                 + (level == n - 1))  # the mid block's transformer
        if not count:
            continue
        side = size // 8 >> level
        dims = dict(queries=side * side, heads=heads[level], dim=channels // heads[level], per_pass=count)
        shapes += [Shape(f"{side}x{side} self", keys=side * side, shared_context=False, **dims),
                   Shape(f"{side}x{side} cross", keys=prompts, shared_context=True, **dims)]
    first = shapes[0]
    check = dataclasses.replace(first, name=f"{first.name.split()[0]} {CHECK_KEYS} keys (mask check)",
                                keys=CHECK_KEYS, per_pass=0, shared_context=True)
    return shapes + [check]


def inputs(shape: Shape, batch: int) -> tuple:
    """q, k, v and the output's cotangent in bfloat16 (k and v broadcast from one context if shared)."""
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (batch, shape.queries, shape.heads, shape.dim))
    context = (1 if shape.shared_context else batch, shape.keys, shape.heads, shape.dim)
    k, v = (jnp.broadcast_to(jax.random.normal(key, context), (batch,) + context[1:]) for key in (kk, kv))
    return tuple(x.astype(jnp.bfloat16) for x in (q, k, v, jax.random.normal(kc, q.shape)))


def forward_backward(kernel: str, dtype=jnp.bfloat16):
    """(q, k, v, cotangent) -> (output, dq, dk, dv), jitted, computing in `dtype`."""
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda *a: attend(*a, kernel), *(x.astype(dtype) for x in (q, k, v)))
        return (out, *vjp(cotangent.astype(dtype)))
    return jax.jit(run)


def rel_error(got, want) -> float:
    """The largest relative L2 error of the arrays `got` against `want`."""
    return max(float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
               for g, w in zip(got, want, strict=True))


def measure_row(shape: Shape, kernel: str, x: tuple, reference: tuple, args) -> dict:
    """One kernel on one shape's inputs `x`: its time, and its error against `reference`."""
    row = {"shape": shape.name, "kernel": kernel, "per_pass": shape.per_pass}
    try:
        run = forward_backward(kernel)
        error = rel_error(run(*x), reference)
        images_per_s, _ = measure(lambda: run(*x), jax.block_until_ready, args)
        row |= {"ms": 1000 * args.batch / images_per_s, "error": error, "ok": error <= TOL}
    except Exception as e:  # a kernel that refuses a shape or fails: recorded, and the run exits 1
        row |= {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "ok": False}
    return row


def default_kernels() -> list[str]:
    fused = choose("auto", jax.default_backend(), jnp.bfloat16, 4096, 64)
    return ["xla"] + ([fused] if fused != "xla" else [])


def table(rows: list[dict], args, device: str) -> str:
    lines = [f"attention kernels, batch {args.batch}, {args.size} px, bfloat16, forward + backward, "
             f"on {device} (error: vs XLA's in float32; ok: <= {TOL})", "",
             "| shape | kernel | ms | per pass ms | error | ok |", "|" + " --- |" * 6]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['shape']} | {r['kernel']} | failed: {r['failed']} | | | no |")
        else:
            lines.append(f"| {r['shape']} | {r['kernel']} | {r['ms']:.2f} | {r['ms'] * r['per_pass']:.2f} | "
                         f"{r['error']:.1e} | {'yes' if r['ok'] else 'NO'} |")
    timed = {(r["shape"], r["kernel"]): r["ms"] * r["per_pass"] for r in rows if "ms" in r}
    shapes = dict.fromkeys(r["shape"] for r in rows)
    lines.append("")
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        # As the model runs: XLA's kernel on the shapes a fused one hands to it.
        handed = [s for s in shapes if (s, kernel) not in timed]
        total = sum(timed.get((s, kernel), timed.get((s, "xla"), 0.0)) for s in shapes)
        lines.append(f"{kernel}: {total:.1f} ms of attention per U-Net pass, forward + backward"
                     + (f" (XLA's on {len(handed)} of {len(shapes)} shapes)" if handed else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    kernels = args.kernels or default_kernels()
    platform = jax.default_backend()
    rows = []
    for shape in unet_shapes(args.size, args.prompts):
        x = inputs(shape, args.batch)
        reference = forward_backward("xla", jnp.float32)(*x)
        for kernel in kernels:
            # A fused kernel that would hand this shape to XLA's (Pallas' on short sequences) is left out.
            if kernel == "xla" or choose(kernel, platform, jnp.bfloat16, shape.queries, shape.dim) != "xla":
                rows.append(measure_row(shape, kernel, x, reference, args))
    print(table(rows, args, jax.devices()[0].device_kind))
    if args.output:
        Path(args.output).write_text(json.dumps({"device": jax.devices()[0].device_kind, "batch": args.batch,
                                                 "size": args.size, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
