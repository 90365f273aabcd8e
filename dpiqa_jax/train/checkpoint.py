"""Orbax checkpoints of a training run, and loading any teacher checkpoint for inference.

A workdir holds everything needed to use the model again:

    DIR/model.json              the TeacherConfig (teacher_config_to_dict)
    DIR/prompt_embeddings.npy   the prompt embeddings the model was trained with
    DIR/checkpoints/latest      params, opt_state and meta (step, RNG, data position): for resume
    DIR/checkpoints/best_srcc   params and meta (step, metrics) of the best evaluation by SRCC
    DIR/checkpoints/best_plcc   the same by PLCC

Each folder keeps one orbax step; orbax writes a step to a temporary folder and renames it when
complete, and deletes the previous step only afterwards, so a kill at any moment leaves the last
complete checkpoint restorable.
"""
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpiqa_jax.errors import UserError

MODEL_FILE, EMBEDDINGS_FILE, CHECKPOINTS = "model.json", "prompt_embeddings.npy", "checkpoints"
LATEST, BEST = "latest", ("best_srcc", "best_plcc")


class RunCheckpoints:
    """The three checkpoint folders of a workdir. Every process calls every method (orbax saves
    collectively; only the primary process writes the JSON parts)."""

    def __init__(self, workdir: str, async_save: bool = True):
        root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.managers = {name: ocp.CheckpointManager(os.path.join(root, name), options=options)
                         for name in (LATEST,) + BEST}

    def save_latest(self, step: int, params, opt_state, meta: dict) -> None:
        """Saved only once the best checkpoints that `meta` mentions are on disk."""
        for name in BEST:
            self.managers[name].wait_until_finished()
        self.managers[LATEST].save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def save_best(self, name: str, step: int, params, meta: dict) -> None:
        manager = self.managers[name]
        if manager.latest_step() == step:  # re-evaluated after a resume: already on disk
            return
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> Optional[int]:
        return self.managers[LATEST].latest_step()

    def restore_latest(self, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict]:
        """(params, opt_state, meta) of the latest step, placed as the abstract trees' shardings."""
        manager = self.managers[LATEST]
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore()))
        return restored.params, restored.opt_state, restored.meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk; a failed save raises here."""
        for manager in self.managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()


def write_model_files(workdir: str, model_dict: dict, embeddings: np.ndarray) -> None:
    """Writes model.json and the prompt embeddings once (primary process); on a rerun, refuses a
    workdir that holds another model."""
    path = os.path.join(workdir, MODEL_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(model_dict)):
            raise UserError(f"{path} describes another model than this config: use a new --workdir")
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    _atomic_write(path, lambda f: f.write(json.dumps(model_dict, indent=2).encode()))
    _atomic_write(os.path.join(workdir, EMBEDDINGS_FILE), lambda f: np.save(f, np.asarray(embeddings)))


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(run folder holding model.json, orbax step folder) for a workdir, a checkpoint folder such
    as DIR/checkpoints/best_srcc, or one of its step folders."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        for name in BEST[:1] + (LATEST,):
            step_dir = _last_step_dir(os.path.join(path, CHECKPOINTS, name))
            if step_dir:
                return path, step_dir
        raise UserError(f"workdir {path!r} holds no checkpoint yet")
    step_dir = path if os.path.isdir(os.path.join(path, "params")) else _last_step_dir(path)
    if step_dir is None:
        raise UserError(f"{path!r} is neither a training workdir nor an orbax checkpoint folder")
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(step_dir)))
    if not os.path.isfile(os.path.join(run_dir, MODEL_FILE)):
        raise UserError(f"no {MODEL_FILE} found for checkpoint {path!r} (expected in {run_dir})")
    return run_dir, step_dir


def _last_step_dir(folder: str) -> Optional[str]:
    if not os.path.isdir(folder):
        return None
    steps = [int(n) for n in os.listdir(folder)
             if n.isdigit() and os.path.isdir(os.path.join(folder, n, "params"))]
    return os.path.join(folder, str(max(steps))) if steps else None


def restore_params(step_dir: str, sharding_fn=None):
    """The full parameter tree of a step folder; `sharding_fn(abstract_tree)` places it (default:
    the first local device)."""
    checkpointer = ocp.StandardCheckpointer()
    item = os.path.join(step_dir, "params")
    tree = checkpointer.metadata(item).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    if sharding_fn is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = sharding_fn(abstract)
    return checkpointer.restore(item, with_shardings(abstract, shardings))


def restore_for_inference(path: str, sharding_fn=None):
    """(TeacherConfig, params, prompt embeddings) from a training workdir (its best-by-SRCC
    checkpoint, else the latest), an orbax checkpoint folder, or the authors' `.pth`."""
    from dpiqa_jax import teacher

    if str(path).endswith(".pth"):
        return teacher.load_teacher(path)
    run_dir, step_dir = resolve_checkpoint(path)
    with open(os.path.join(run_dir, MODEL_FILE)) as f:
        model_cfg = teacher.teacher_config_from_dict(json.load(f))
    embeddings = np.load(os.path.join(run_dir, EMBEDDINGS_FILE))
    return model_cfg, restore_params(step_dir, sharding_fn), embeddings


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the shardings orbax restores into."""
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return jax.tree.map(place, abstract_tree, shardings)
