"""Student checkpoints in every form we read, and our own weight files.

Read: the authors' state dict (`.pth`, or `.safetensors` with their names), our exports (`.msgpack`,
`.safetensors`) and distillation workdirs (`restore_student_checkpoint`). Our exports carry a
manifest (JSON): format and version, the StudentSpec, every tensor's name, shape and dtype, and a
sha256 of the tensors, so that a changed, truncated or mislabelled file is refused by name.
"""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from dpiqa_jax import checkpoints
from dpiqa_jax.errors import UserError
from dpiqa_jax.models.student import Student
from dpiqa_jax.weights import torch_files
from dpiqa_jax.weights.student import load_student_pth, load_variables
from dpiqa_jax.weights.torch_names import to_state_dict

Variables = dict[str, Any]

FORMAT, FORMAT_VERSION = "dpiqa_jax.student", 1
MANIFEST_KEY = "dpiqa_jax"  # the manifest's entry in a msgpack file or a safetensors header
COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """What rebuilds a student around its weights; `image_size` (the input side) fixes fc1's width."""

    variant: str
    map_channels: int = 8
    fc_width: int = 512
    image_size: int = 512

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "StudentSpec":
        """The inverse of `to_dict`; ValueError for unknown or missing fields."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown or "variant" not in d:
            raise ValueError(f"a student spec needs 'variant' and takes no {sorted(unknown)}")
        return cls(str(d["variant"]), **{k: int(v) for k, v in d.items() if k != "variant"})

    def model(self, dtype=jnp.float32) -> Student:
        return Student(self.variant, self.map_channels, self.fc_width, dtype=dtype)

    def variable_shapes(self) -> Variables:
        images = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
        return jax.eval_shape(self.model().init, jax.random.PRNGKey(0), images)


AUTHORS_SPEC = StudentSpec("b7")  # the released students: EfficientNet-B7 on 512-px images


def student_apply(spec: StudentSpec, dtype=jnp.float32):
    """The jitted eval-mode forward pass `(variables, images) -> (scores (B,), maps)`, one per spec and
    dtype, so that every caller (scorer, export checks) shares its compiled programs."""
    return _jitted_apply(spec, jnp.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _jitted_apply(spec: StudentSpec, dtype: jnp.dtype):
    model = spec.model(dtype)
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def student_state_dict(variables: Variables) -> dict[str, np.ndarray]:
    """The authors' PyTorch names and layouts for `params` and `batch_stats` together."""
    state = {}
    for collection in COLLECTIONS:
        state.update(to_state_dict(variables.get(collection, {})))
    return state


# --- manifests ---------------------------------------------------------------------------------

def tensor_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, then the C-order bytes): it
    depends on the values, not on how a file format lays them out."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        h.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def make_manifest(spec: StudentSpec, tensors: Mapping[str, np.ndarray]) -> str:
    """The manifest (JSON text) of `tensors`, named as the file stores them."""
    listed = {name: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
              for name, a in sorted(tensors.items())}
    return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "student": spec.to_dict(),
                       "sha256": tensor_digest(tensors), "tensors": listed})


def _parse_manifest(path: str, text: str) -> tuple[dict, StudentSpec]:
    try:
        manifest = json.loads(text)
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}")
        if int(manifest["version"]) > FORMAT_VERSION:
            raise ValueError(f"version {manifest['version']}, newer than this dpiqa_jax reads")
        spec = StudentSpec.from_dict(manifest["student"])
        listed = {name: (tuple(entry["shape"]), str(entry["dtype"]))
                  for name, entry in manifest["tensors"].items()}
        return {"sha256": str(manifest["sha256"]), "tensors": listed}, spec
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: unusable dpiqa_jax manifest ({e})") from e


def _check_tensors(path: str, listed: Mapping[str, tuple], tensors: Mapping[str, np.ndarray]) -> None:
    problems = [f"{name} (missing from the file)" for name in sorted(set(listed) - set(tensors))]
    problems += [f"{name} (not in the manifest)" for name in sorted(set(tensors) - set(listed))]
    for name in sorted(set(listed) & set(tensors)):
        array = np.asarray(tensors[name])
        if (array.shape, str(array.dtype)) != listed[name]:
            shape, dtype = listed[name]
            problems.append(f"{name} (file {array.shape} {array.dtype}, manifest {shape} {dtype})")
    if problems:
        raise UserError(f"{path}: does not match its manifest: {'; '.join(problems)}")


def _checked_spec(path: str, manifest_text: str, tensors: Mapping[str, np.ndarray],
                 requested: Optional[StudentSpec] = None) -> StudentSpec:
    """The manifest's StudentSpec, once the file's tensors match the manifest (names, shapes, dtypes,
    sha256). A `requested` spec must agree with it."""
    manifest, spec = _parse_manifest(path, manifest_text)
    _check_tensors(path, manifest["tensors"], tensors)
    digest = tensor_digest(tensors)
    if digest != manifest["sha256"]:
        raise UserError(f"{path}: sha256 mismatch, the tensors changed after export "
                        f"(manifest {manifest['sha256'][:12]}..., file {digest[:12]}...)")
    if requested is not None and requested != spec:
        raise UserError(f"{path}: its manifest describes {spec}, not the requested {requested}")
    return spec


# --- our files ---------------------------------------------------------------------------------

def save_msgpack(spec: StudentSpec, variables: Variables, path: str) -> None:
    """{manifest, variables} in one msgpack file; the variables as `flax.serialization` writes them."""
    tree = jax.tree.map(np.asarray, {c: variables[c] for c in COLLECTIONS})
    manifest = make_manifest(spec, traverse_util.flatten_dict(tree, sep="/"))
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({MANIFEST_KEY: manifest, "variables": tree}))


def save_safetensors(spec: StudentSpec, variables: Variables, path: str) -> None:
    """The authors' names and layouts (PyTorch loads it into their student), the manifest in the header."""
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(v) for k, v in student_state_dict(variables).items()}
    save_file(state, path, metadata={MANIFEST_KEY: make_manifest(spec, state)})


def _load_msgpack(path: str, requested: Optional[StudentSpec]) -> tuple[StudentSpec, Variables]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        content = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack reports damage with several exception types
        raise UserError(f"{path}: not a readable msgpack file ({e})") from e
    if not isinstance(content, dict) or not isinstance(content.get("variables"), dict) \
            or MANIFEST_KEY not in content:
        raise UserError(f"{path}: not a dpiqa_jax student export (no manifest)")
    variables = content["variables"]
    flat = traverse_util.flatten_dict(variables, sep="/")
    spec = _checked_spec(path, content[MANIFEST_KEY], flat, requested)
    return spec, load_variables(spec.variable_shapes(), student_state_dict(variables), source=path)


def _pickle_keys(path: str) -> list:
    """The keys of a torch-pickled state dict, read cheaply: torch maps its tensors, not reads them."""
    obj = torch_files.load_state_pickle(path)
    return list(obj) if isinstance(obj, dict) else []


# --- entry points ------------------------------------------------------------------------------

def is_student_checkpoint(path) -> bool:
    """Whether `path` holds a student: a distillation workdir or checkpoint folder, one of our
    exports, or a state dict with `base_model.` keys."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return bool(checkpoints.resolve(path, checkpoints.STUDENT_FILE))
        except UserError:
            return False
    if not os.path.isfile(path):
        return False
    if path.endswith(".msgpack"):
        return True
    if path.endswith(".safetensors"):
        keys, metadata = torch_files.safetensors_header(path)
    else:
        keys, metadata = _pickle_keys(path), {}
    return MANIFEST_KEY in metadata or any(str(k).startswith("base_model.") for k in keys)


def restore_student_checkpoint(folder: str) -> tuple[StudentSpec, Variables]:
    """(StudentSpec, variables) from a distillation workdir (its best-by-SRCC checkpoint, else the
    latest) or one of its checkpoint or step folders."""
    run_dir, step_dir = checkpoints.resolve(folder, checkpoints.STUDENT_FILE)
    with open(os.path.join(run_dir, checkpoints.STUDENT_FILE)) as f:
        spec = StudentSpec.from_dict(json.load(f))
    return spec, checkpoints.restore_item(step_dir)


def load_student(path, spec: Optional[StudentSpec] = None) -> tuple[StudentSpec, Variables]:
    """(StudentSpec, variables) of a student checkpoint: a folder (`restore_student_checkpoint`), our
    `.msgpack` or `.safetensors` export (the spec comes from its manifest), or the authors' state dict
    (`.pth`, or `.safetensors` with their names) whose shapes `spec` gives (default `AUTHORS_SPEC`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return restore_student_checkpoint(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".msgpack"):
        return _load_msgpack(path, spec)
    safetensors = path.endswith(".safetensors")
    manifest = torch_files.safetensors_header(path)[1].get(MANIFEST_KEY) if safetensors else None
    if manifest is not None:
        state = torch_files.read_tensors(path)
        spec = _checked_spec(path, manifest, state, spec)
        return spec, load_variables(spec.variable_shapes(), state, source=path)
    spec = spec or AUTHORS_SPEC
    return spec, load_student_pth(path, spec.model(), spec.image_size)
