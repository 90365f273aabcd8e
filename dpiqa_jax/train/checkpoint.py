"""Orbax checkpoints of a training run (read for inference by `dpiqa_jax.checkpoints`).

A workdir holds everything needed to use the model again:

    DIR/model.json              the TeacherConfig (teacher_config_to_dict); student.json for a student
    DIR/prompt_embeddings.npy   the prompt embeddings the teacher was trained with
    DIR/checkpoints/latest      params, opt_state and meta (step, RNG, data position): for resume
    DIR/checkpoints/best_srcc   params and meta (step, metrics) of the best evaluation by SRCC
    DIR/checkpoints/best_plcc   the same by PLCC

Each folder keeps one orbax step; orbax writes a step to a temporary folder and renames it when
complete, and deletes the previous step only afterwards, so a kill at any moment leaves the last
complete checkpoint restorable.
"""
import contextlib
import fcntl
import functools
import json
import os
import re
import socket
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpiqa_jax import outputs
from dpiqa_jax.checkpoints import BEST, CHECKPOINTS, EMBEDDINGS_FILE, LATEST, UNREADABLE, naming_folder
from dpiqa_jax.errors import UserError


class SaveError(UserError):
    """An asynchronous save failed (full disk, permissions): the run stops, the last good one stays."""


# Orbax raises a failed background save at the next save or wait of that folder.
_reporting = functools.partial(naming_folder, error_type=SaveError,
                               failure="saving a checkpoint failed, so the run stops (the last complete "
                                       "checkpoint is kept)")


class RunCheckpoints:
    """The three checkpoint folders of a workdir. Every process calls every method (orbax saves
    collectively; only the primary process writes the JSON parts)."""

    def __init__(self, workdir: str, async_save: bool = True):
        root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        self.managers = {name: ocp.CheckpointManager(os.path.join(root, name),
                                                     options=_options(name, async_save))
                         for name in (LATEST,) + BEST}

    def save_latest(self, step: int, params, opt_state, meta: dict) -> None:
        """Saved only once the best checkpoints that `meta` mentions are on disk."""
        for name in BEST:
            self._wait(name)
        with _reporting(self.managers[LATEST].directory):
            self.managers[LATEST].save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)))

    def save_best(self, name: str, step: int, params, meta: dict) -> None:
        manager = self.managers[name]
        if manager.latest_step() == step:  # re-evaluated after a resume: already on disk
            return
        with _reporting(manager.directory):
            manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> Optional[int]:
        return self.managers[LATEST].latest_step()

    def restore_latest(self, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of the latest step, placed as the abstract trees' shardings."""
        manager = self.managers[LATEST]
        step = manager.latest_step()
        with naming_folder(os.path.join(manager.directory, str(step)), UNREADABLE):
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore()))
        return restored.params, restored.opt_state, restored.meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; a failed save raises SaveError."""
        for name in self.managers:
            self._wait(name)

    def _wait(self, name: str) -> None:
        with _reporting(self.managers[name].directory):
            self.managers[name].wait_until_finished()

    def close(self, failing: bool = False) -> None:
        """Finishes pending saves and closes every folder. `failing`: the run is already stopping
        on an error, which a save failure found here must not hide."""
        error = None
        for manager in self.managers.values():
            try:
                with _reporting(manager.directory):
                    manager.close()
            except SaveError as e:
                error = error or e
        if error and not failing:
            raise error


def _options(name: str, async_save: bool) -> ocp.CheckpointManagerOptions:
    # The folders save the same step at once: each needs its own multi-host barrier names. Process 0
    # lists the saved steps and tells the others, so that every host resumes from the same step (a
    # network file system may show one host a listing that lags) and one host reads the folder, not all.
    return ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
        single_host_load_and_broadcast=True)


def write_model_files(workdir: str, model_file: str, model_dict: dict, embeddings=None) -> None:
    """Writes `model_file` (JSON) and the prompt embeddings, if any, once (primary process); on a
    rerun, refuses a workdir that holds another model."""
    path = os.path.join(workdir, model_file)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(model_dict)):
            raise UserError(f"{path} describes another model than this config: use a new --workdir")
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(model_dict, indent=2).encode()))
    if embeddings is not None:
        atomic_write(os.path.join(workdir, EMBEDDINGS_FILE), lambda f: np.save(f, np.asarray(embeddings)))


_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")  # temporary()'s names


def temporary(path: str) -> str:
    """Where this process writes `path` (a file or a folder) before renaming it into place:
    `PATH.tmp-HOST-PID`, this host's and process's own, as the processes of several hosts may write
    one path (on shared storage) and containers give their processes the same pids."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def temporary_owner(name: str) -> Optional[tuple[str, str, int]]:
    """(NAME, host, pid) of a temporary's file or folder name (`temporary`), or None for any other."""
    match = _TEMPORARY.match(name)
    return (match["name"], match["host"], int(match["pid"])) if match else None


def atomic_write(path: str, write) -> None:
    """`write(binary file)` into a temporary file (`temporary`) renamed to `path`: `path` never holds
    a partial file."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def mark_used(path: str) -> bool:
    """Sets `path`'s modification time to now, its last use for `dpiqa-jax caches` (on read-only
    storage it stays); False where there is no `path`."""
    if not os.path.exists(path):
        return False
    with contextlib.suppress(OSError):
        os.utime(path)
    return True


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds `workdir` for one run (process 0 of it): a second run started there (the same command
    twice, a job resubmitted while the first still runs) stops with one line, instead of both
    writing its checkpoints. The kernel releases the lock when its process ends, however it ends.
    A file system without locks (e.g. gcsfuse) goes without this check."""
    if jax.process_index() != 0:
        yield
        return
    new = not os.path.isdir(workdir)
    outputs.folder(workdir, "run's workdir")
    with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{workdir} is in use by another run ({f.read().strip() or 'unknown'}): wait "
                            f"for it to end, or give this run another workdir") from None
        except OSError:  # no locks on this file system
            pass
        else:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
        try:
            yield
        except BaseException:  # a first run that failed before writing anything leaves no workdir
            if new and os.listdir(workdir) == [LOCK_FILE]:
                with contextlib.suppress(OSError):
                    os.remove(f.name)
                    os.rmdir(workdir)
            raise
