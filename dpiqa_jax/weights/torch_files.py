"""Reading PyTorch checkpoint files safely: safetensors, or pickles through
`torch.load(weights_only=True)` (which refuses pickles that would run code). Every torch pickle
the package reads goes through `load_pickle`."""
import json
import os
import re

import ml_dtypes
import numpy as np

from dpiqa_jax.errors import UserError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# torch.load(weights_only=True) could still be made to run code before 2.6 (CVE-2025-32434).
MIN_TORCH = (2, 6)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UserError("reading a PyTorch .pth file needs torch: pip install 'dpiqa_jax[torch]'") from e
    if tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2]) < MIN_TORCH:
        raise UserError(f"torch {torch.__version__} cannot load .pth files safely (weights_only has a known "
                        f"bypass before {'.'.join(map(str, MIN_TORCH))}): upgrade torch or use safetensors")
    return torch


def to_numpy(value):
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    return value


def read_tensors(path: str) -> dict:
    """The flat {name: array} of a state-dict file (.safetensors or a torch pickle). Where the format
    allows (safetensors, zip-format pickles) the arrays map the file instead of copying it: a
    multi-GB checkpoint is read from the page cache as its arrays are used (read-only for
    safetensors; copy what you keep)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _map_safetensors(path)
    obj = load_state_pickle(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: to_numpy(v) for k, v in obj.items()}


# safetensors' dtype names; bfloat16 is ml_dtypes' (a dependency of jax)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def safetensors_header(path: str) -> tuple[list, dict]:
    """(tensor names, metadata) of a safetensors file, read from its header alone, which safetensors
    checks against the file (offsets, sizes, dtypes)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "numpy") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as e:  # safetensors reports damage with several exception types
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e


def _map_safetensors(path: str) -> dict:
    """The arrays of a .safetensors file as views of one read-only memory map of it. The format: an
    8-byte little-endian header length, a JSON header (name -> dtype, shape and byte offsets into
    the data that follows), the data."""
    names = safetensors_header(path)[0]  # safetensors checks the header against the file
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        data, start = np.memmap(path, np.uint8, mode="r"), 8 + length
    except Exception as e:  # the file changed since safetensors read its header
        raise UserError(f"{path}: not a readable safetensors file ({e})") from e
    arrays = {}
    for name in names:
        dtype, shape, (begin, stop) = (header[name][k] for k in ("dtype", "shape", "data_offsets"))
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: {name} is {dtype}, which dpiqa_jax does not read "
                            f"({', '.join(SAFETENSORS_DTYPES)})")
        arrays[name] = data[start + begin:start + stop].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
    return arrays


def load_pickle(path, mmap: bool = False):
    """torch.load with weights_only=True: tensors, lists, dicts and numbers only. `mmap` maps the
    tensors of a zip-format file instead of reading them (other files are read whole)."""
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # unpickling errors come in many types; all mean "unusable file"
        if mmap:  # only zip-format files map: read the rest (or say why it cannot be read)
            return load_pickle(path)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read as a weights-only PyTorch file ({reason})") from e


def load_state_pickle(path: str):
    """What a torch pickle holds (its `state_dict` entry where it wraps one), the tensors of a
    zip-format file mapped."""
    obj = load_pickle(path, mmap=True)
    return obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj


def read_array(path: str) -> np.ndarray:
    """A single tensor saved with torch.save / np.save / safetensors (one entry)."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if path.endswith(".safetensors"):
        values = list(read_tensors(path).values())
    else:
        obj = to_numpy(load_pickle(path))
        values = list(obj.values()) if isinstance(obj, dict) else [obj]
    if len(values) != 1 or not isinstance(values[0], np.ndarray):
        raise UserError(f"{path}: expected a single tensor")
    return values[0]
