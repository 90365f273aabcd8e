"""Finding and reading our own checkpoints for inference (training workdirs and orbax folders).

A training workdir (see `train/checkpoint.py`) looks like

    DIR/model.json                      the model's config (e.g. a TeacherConfig as a dict)
    DIR/prompt_embeddings.npy           teacher runs: the prompt matrix it was trained with
    DIR/checkpoints/{latest,best_srcc,best_plcc}/STEP/params   orbax items

and `teacher.save_teacher` writes the same files flat: DIR/model.json, DIR/params, ...
"""
import contextlib
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from dpiqa_jax.errors import UserError

MODEL_FILE, EMBEDDINGS_FILE = "model.json", "prompt_embeddings.npy"
STUDENT_FILE = "student.json"  # a distillation workdir's StudentSpec, in place of model.json
CHECKPOINTS, PARAMS = "checkpoints", "params"
LATEST, BEST = "latest", ("best_srcc", "best_plcc")
UNREADABLE = "cannot restore this checkpoint (incomplete or damaged files)"


@contextlib.contextmanager
def naming_folder(folder: str, failure: str, error_type: type = UserError):
    """Any error of orbax or its storage inside the block becomes one `error_type` line naming
    `folder` (orbax wraps file system errors in several exception types)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split())
        raise error_type(f"{folder}: {failure}: {type(e).__name__}: {reason}") from None


def resolve(path: str, model_file: str = MODEL_FILE) -> tuple[str, str]:
    """(folder holding `model_file`, orbax step folder) for a workdir (its best-by-SRCC checkpoint,
    else the latest), a checkpoint folder such as DIR/checkpoints/best_srcc, one of its step
    folders, or a flat folder holding `model_file` and `params`."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, model_file)):
        if os.path.isdir(os.path.join(path, PARAMS)):
            return path, path
        for name in (BEST[0], LATEST):
            step_dir = _last_step_dir(os.path.join(path, CHECKPOINTS, name))
            if step_dir:
                return path, step_dir
        raise UserError(f"workdir {path!r} holds no checkpoint yet")
    step_dir = path if os.path.isdir(os.path.join(path, PARAMS)) else _last_step_dir(path)
    if step_dir is None:
        other = {MODEL_FILE: "a teacher's", STUDENT_FILE: "a student's"}
        for name, whose in other.items():
            if name != model_file and os.path.isfile(os.path.join(path, name)):
                raise UserError(f"{path!r} is {whose} workdir ({name}); this command takes "
                                f"{other[model_file]} here")
        raise UserError(f"{path!r} is neither a training workdir nor an orbax checkpoint folder")
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(step_dir)))
    if not os.path.isfile(os.path.join(run_dir, model_file)):
        raise UserError(f"no {model_file} found for checkpoint {path!r} (expected in {run_dir})")
    return run_dir, step_dir


def _last_step_dir(folder: str) -> Optional[str]:
    if not os.path.isdir(folder):
        return None
    steps = [int(n) for n in os.listdir(folder)
             if n.isdigit() and os.path.isdir(os.path.join(folder, n, PARAMS))]
    return os.path.join(folder, str(max(steps))) if steps else None


def restore_item(step_dir: str, item: str = PARAMS, sharding_fn=None):
    """An orbax item of a step folder with the shapes it was saved with; `sharding_fn(abstract
    tree)` places it (default: the first local device)."""
    checkpointer = ocp.StandardCheckpointer()
    folder = os.path.join(step_dir, item)
    with naming_folder(folder, UNREADABLE):
        tree = checkpointer.metadata(folder).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    if sharding_fn is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = sharding_fn(abstract)
    with naming_folder(folder, UNREADABLE):
        return checkpointer.restore(folder, with_shardings(abstract, shardings))


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the shardings orbax restores into."""
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return jax.tree.map(place, abstract_tree, shardings)
