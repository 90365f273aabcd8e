"""Input pipeline throughput: 1024x768 JPEGs (KonIQ's size) -> 512x512 float batches.

    python benchmarks/pipeline.py [--images 64] [--batches 12] [--batch-size 16]

Writes generated photo-like JPEGs in KonIQ-10k's layout to a temporary folder, prepares them with
the `koniq10k` builder, and times `train_batches` (its thread pool on every core) handed to the
devices as training does (`to_global`), with float32 images and with uint8 images scaled on the
device (what training uses), after one warm-up batch; and `load_image` alone on one core. It
prints images/s per core next to the rate one teacher training step consumes, and the goal: 16
host cores feed 3x the fastest step.
"""
import argparse
import csv
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

AUTHORS_STEP = 31.2  # images/s of one teacher training step, authors' PyTorch on an H200 (SPEC.md)
OUR_STEP_GOAL = 100.0  # images/s our JAX step aims at
HOST_CORES = 16


def photo_jpeg(seed: int) -> bytes:
    """A 1024x768 JPEG of one of scikit-image's photos plus grain, quality 90 (about KonIQ's size)."""
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")
    rng = np.random.default_rng(seed)
    image = Image.fromarray(getattr(data, names[seed % len(names)])()).resize((1024, 768), Image.BICUBIC)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (768, 1024, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_koniq(root: Path, count: int) -> None:
    (root / "1024x768").mkdir(parents=True)
    with open(root / "koniq10k_distributions_sets.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"])
        for i in range(count):
            (root / "1024x768" / f"{i}.jpg").write_bytes(photo_jpeg(i))
            out.writerow([f"{i}.jpg", 1, 1, 1, 1, 1, 5, 50 + i % 40, 9, "training"])


def time_pipeline(data_dir: str, batch_size: int, batches: int, image_dtype: str) -> float:
    import jax

    from dpiqa_jax.data.pipeline import to_global, train_batches
    from dpiqa_jax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(1)
    stream = train_batches("koniq10k", "random", batch_size=batch_size, image_size=512, data_dir=data_dir,
                           process_index=0, process_count=1, image_dtype=image_dtype)
    jax.block_until_ready(to_global(next(stream), mesh, mesh_lib.BATCH_AXES))  # warm-up: threads, compile
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(to_global(next(stream), mesh, mesh_lib.BATCH_AXES))
    return batches * batch_size / (time.perf_counter() - start)


def time_load_image(jpegs: list, repeats: int = 2) -> float:
    from dpiqa_jax.data.images import load_image

    start = time.perf_counter()
    for _ in range(repeats):
        for jpeg in jpegs:
            load_image(jpeg, 512)
    return repeats * len(jpegs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        manual = Path(tmp) / "manual"
        write_koniq(manual, args.images)
        from dpiqa_jax.data.source import prepare

        prepare("koniq10k", data_dir=str(Path(tmp) / "tfds"), manual_dir=str(manual))
        single = time_load_image([photo_jpeg(i) for i in range(8)])
        rates = {dtype: time_pipeline(str(Path(tmp) / "tfds"), args.batch_size, args.batches, dtype)
                 for dtype in ("float32", "uint8")}
    print(f"load_image alone, one core:       {single:7.1f} images/s")
    for dtype, total in rates.items():
        print(f"train_batches ({dtype:7}) on {cores} cores: {total:7.1f} images/s = "
              f"{total / cores:.1f} per core")
    per_core = rates["uint8"] / cores
    print(f"teacher training step consumes:   {AUTHORS_STEP:7.1f} images/s (authors, H200), "
          f"{OUR_STEP_GOAL:.0f} (our goal)")
    print(f"{HOST_CORES} cores at this rate feed:     {HOST_CORES * per_core:7.1f} images/s; goal "
          f"{3 * OUR_STEP_GOAL:.0f} (3x our step), at least 200")


if __name__ == "__main__":
    main()
