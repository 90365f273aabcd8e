"""Run by test_example_cache.py as one of two jax.distributed processes on localhost: builds caches
whose pass is a collective (as the trainer's pass over the train images is) under a root both
processes share, then under roots of their own; prints, as JSON, which builds this process wrote."""
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpiqa_jax.train import example_cache

INDICES = np.arange(6)
writes, passes = [], []


def compute():
    """Example i's row is 2 * i: the sum of both processes' shares, so every process must take part."""
    passes.append(1)
    for start in (0, 3):
        index = INDICES[start:start + 3]
        gathered = multihost_utils.process_allgather(index.astype(np.float32))
        yield {"value": gathered.sum(0)[:, None], "index": index, "mask": np.ones(3, np.float32)}


def build(folder, identity, indices, shapes, make_batches, write):
    writes.append(write)
    original(folder, identity, indices, shapes, make_batches, write)


def load(root: Path) -> dict:
    """What this process wrote, whether a pass ran, and the rows it reads."""
    writes.clear(), passes.clear()
    cache = example_cache.load_or_build(str(root), "values", {"model": "x"}, INDICES, {"value": (1,)},
                                        compute)
    rows = cache.join({"index": INDICES})["value"][:, 0].tolist()
    return {"wrote": any(writes), "pass": bool(passes), "rows": rows}


if __name__ == "__main__":
    port, me, tmp = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=me)
    original, example_cache._build = example_cache._build, build
    report = {"shared": load(tmp / "shared"), "own": load(tmp / f"own{me}")}
    if me == 1:  # this host lost its cache (a replaced machine with a local cache_dir)
        shutil.rmtree(tmp / "own1" / "values")
    multihost_utils.sync_global_devices("removed")
    report["one_lacks"] = load(tmp / f"own{me}")
    report["all_have"] = load(tmp / f"own{me}")
    print(json.dumps(report), flush=True)
