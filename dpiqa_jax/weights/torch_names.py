"""Map PyTorch state dicts onto Flax variable trees by name, and back.

Our Flax modules use PyTorch's module names (dots included), so the PyTorch key of a Flax
leaf is its path joined by '.', with the leaf renamed (`kernel`/`scale`/`embedding` ->
`weight`, batch-norm `mean`/`var` -> `running_mean`/`running_var`) and the array laid out
as PyTorch lays it out (conv kernels OIHW <-> HWIO, dense kernels transposed).
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from dpiqa_jax.errors import UserError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight",
                  "mean": "running_mean", "var": "running_var"}


class WeightsError(UserError, ValueError):
    """A state dict that does not fit the model: the message names the file and every bad key."""


def torch_key(path: tuple[str, ...], prefix: str = "") -> str:
    *modules, leaf = path
    return prefix + ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def load_state_dict(target: Any, state: Mapping[str, np.ndarray], prefix: str = "",
                    source: str = "state dict") -> Any:
    """Fill `target` (a tree of arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`) from
    `state`, whose keys are PyTorch names under `prefix`, with new C-ordered numpy arrays. Keys of
    `state` the tree does not use are ignored. Raises WeightsError naming every missing or
    mis-shaped key at once."""
    missing, misshaped = [], []

    def view(path, spec) -> Optional[np.ndarray]:
        names = _path_names(path)
        key = torch_key(names, prefix)
        if key not in state:
            missing.append(key)
            return None
        value = to_flax_layout(names[-1], np.asarray(state[key]))
        if tuple(value.shape) != tuple(spec.shape):
            shown = to_torch_layout(names[-1], np.empty(spec.shape, np.uint8)).shape
            misshaped.append(f"{key} (file {tuple(state[key].shape)}, model {tuple(shown)})")
            return None
        return value

    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    views = [view(path, spec) for path, spec in leaves]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {', '.join(misshaped)}")
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))
    # The transposing copies are most of loading a large file, and numpy lets go of the GIL while
    # it copies: a thread per core. They also read a memory-mapped file's pages in.
    with ThreadPoolExecutor() as pool:
        arrays = pool.map(lambda value, leaf: np.array(value, leaf[1].dtype, order="C"), views, leaves)
        return jax.tree_util.tree_unflatten(treedef, list(arrays))


def to_state_dict(tree: Any, prefix: str = "", convert: Callable = np.asarray) -> dict[str, np.ndarray]:
    """The inverse of `load_state_dict`: PyTorch names and layouts for every leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {torch_key(_path_names(p), prefix): to_torch_layout(_path_names(p)[-1], convert(v))
            for p, v in flat}
