"""Run by test_exported.py as each of 2 jax.distributed processes (one CPU device each): the stored
train step on a mesh across processes, from folders of each process's own (a host's local cache).
Takes FOLDER and the CLI's --coordinator, --num-processes and --process-id (`train_helpers.
start_processes`). Prints JSON: per start, whether the step that runs is the stored program."""
import argparse
import json

import jax

parser = argparse.ArgumentParser()
for flag in ("folder", "--coordinator", "--num-processes", "--process-id"):
    parser.add_argument(flag)
options = parser.parse_args()
PROCESS, FOLDER = int(options.process_id), options.folder
jax.distributed.initialize(options.coordinator, num_processes=int(options.num_processes), process_id=PROCESS)

from test_exported import IDENTITY, refuse, setup, two_steps  # noqa: E402 -- after initialize

from dpiqa_jax.train import exported  # noqa: E402


def start(folder: str, export_refused: bool = False) -> bool:
    """One start's agreed step from `folder`; checks its two steps give the plain step's (this
    process's shards); True where it is the stored program."""
    export = exported.export.export
    if export_refused:
        exported.export.export = refuse
    try:
        ready = exported.agreed(exported.train_step(step, args, IDENTITY, mesh, folder), step)
    finally:
        exported.export.export = export
    for got, want in zip(jax.tree.leaves(two_steps(ready, args)), jax.tree.leaves(two_steps(step, args)),
                         strict=True):
        assert (got.addressable_data(0) == want.addressable_data(0)).all()
    return isinstance(ready, exported.FlatStep)


step, args, mesh = setup()
assert mesh.devices.size == 2 and len(mesh.local_devices) == 1
own = f"{FOLDER}/{PROCESS}"
stored = [start(own),  # cold: both export
          start(own, export_refused=True),  # warm: both read theirs (an export would be refused)
          # process 1 from an empty folder where export is refused, process 0 warm: neither uses it
          start(own if PROCESS == 0 else f"{FOLDER}/empty", export_refused=PROCESS == 1)]
print(json.dumps(stored))
