"""Train/test splits that researchers can compare with.

    official                 the dataset's own parts (KonIQ-10k's `set` column, FLIVE's is_valid
                             file, synthetic_iqa's disjoint photos); `official:validation` scores
                             the validation part instead of the test part
    random[:SEED[:FRACTION]] a seeded random split, train fraction 0.8 by default; the same split
                             on any machine and any number of hosts (a hash order, not an RNG
                             stream); seeds 0-9 give the usual 10-split protocol
    indices:TRAIN[,TEST]     index files: .npy, .txt, .json, or the authors' `*_train_indices.pth`
                             (a list of ints); without TEST the test part is the rest

Indices are the `index` feature of the TFDS builders: the row order in which the authors enumerate
each dataset. Train and test never share an image (resolve raises otherwise).
"""
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.errors import UserError

KINDS = ("official", "random", "indices")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    kind: str = "random"
    seed: int = 0
    train_fraction: float = 0.8
    train_file: Optional[str] = None
    test_file: Optional[str] = None
    test_part: str = "test"  # the official part scored as `test`

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DatasetError(f"split kind {self.kind!r} is not one of {KINDS}")
        if not 0.0 < self.train_fraction < 1.0:
            raise DatasetError(f"split train fraction {self.train_fraction} is not between 0 and 1")
        if self.kind == "indices" and not self.train_file:
            raise DatasetError("split 'indices' needs a train index file: indices:TRAIN[,TEST]")


def parse_split(split: Union[str, SplitSpec]) -> SplitSpec:
    """A SplitSpec from its text form (module docstring), or `split` itself if already one."""
    if isinstance(split, SplitSpec):
        return split
    kind, _, rest = split.partition(":")
    try:
        if kind == "official":
            return SplitSpec("official", test_part=rest or "test")
        if kind == "random":
            seed, _, fraction = rest.partition(":")
            return SplitSpec("random", seed=int(seed or 0), train_fraction=float(fraction or 0.8))
    except ValueError:
        raise DatasetError(f"split {split!r}: expected random[:SEED[:FRACTION]]") from None
    if kind == "indices":
        train, _, test = rest.partition(",")
        return SplitSpec("indices", train_file=train, test_file=test or None)
    raise DatasetError(f"split {split!r}: expected official[:PART], random[:SEED[:FRACTION]] or "
                       "indices:TRAIN[,TEST]")


def hash_order(values: np.ndarray, *key: int) -> np.ndarray:
    """`values` in a pseudo-random order fixed by `key` alone (blake2b, no RNG version drift)."""
    prefix = ":".join(str(k) for k in key).encode()
    ranks = [int.from_bytes(hashlib.blake2b(prefix + b"/%d" % v, digest_size=8).digest(), "big")
             for v in values.tolist()]
    return values[np.argsort(np.asarray(ranks, dtype=np.uint64), kind="stable")]


def resolve(split: Union[str, SplitSpec], parts: Mapping[str, np.ndarray],
            dataset: str) -> dict[str, np.ndarray]:
    """{'train': sorted indices, 'test': sorted indices, ...} of `dataset`, whose TFDS splits hold
    `parts` (split name -> indices). An official split also returns its other parts by name."""
    spec = parse_split(split)
    everything = np.sort(np.concatenate([np.asarray(v, np.int64) for v in parts.values()]))
    if spec.kind == "official":
        result = _official(spec, parts, dataset)
    elif spec.kind == "random":
        order = hash_order(everything, spec.seed)
        cut = int(len(order) * spec.train_fraction)
        result = {"train": order[:cut], "test": order[cut:]}
    else:
        train = read_indices(spec.train_file)
        test = read_indices(spec.test_file) if spec.test_file else np.setdiff1d(everything, train)
        for path, ids in ((spec.train_file, train), (spec.test_file, test)):
            unknown = np.setdiff1d(ids, everything)
            if len(unknown):
                raise DatasetError(f"{path}: {len(unknown)} indices are not in {dataset} (which has "
                                   f"{len(everything)} images): {', '.join(map(str, unknown.tolist()))}")
        result = {"train": train, "test": test}
    result = {k: np.unique(v) for k, v in result.items()}
    shared = np.intersect1d(result["train"], result["test"])
    if len(shared):
        raise DatasetError(f"{dataset} split {split}: train and test share {len(shared)} images: "
                           f"{', '.join(map(str, shared.tolist()))}")
    return result


def _official(spec: SplitSpec, parts: Mapping[str, np.ndarray], dataset: str) -> dict[str, np.ndarray]:
    if "train" not in parts or spec.test_part not in parts:
        raise DatasetError(f"{dataset} has no official split with parts 'train' and {spec.test_part!r} (its "
                           f"parts: {sorted(parts)}); use split 'random' or 'indices:FILE'")
    result = {name: np.asarray(ids, np.int64) for name, ids in parts.items()}
    result["test"] = result[spec.test_part]
    return result


def read_indices(path: Union[str, Path]) -> np.ndarray:
    """A 1-D int64 array of indices from a .npy, .txt (whitespace or comma separated), .json list,
    or a PyTorch-saved list/tensor of ints (.pth/.pt, loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: index file not found")
    try:
        values = _read(path)
        array = np.asarray(values)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"expected a flat list of integers, got {array.dtype} of shape {array.shape}")
    except UserError:  # already names the file (an unsafe or unreadable .pth, a too-old torch)
        raise
    except Exception as e:  # each reader raises its own types; the message says which file
        reason = " ".join(str(e).split())
        raise DatasetError(f"{path}: not an index file ({type(e).__name__}: {reason})") from None
    if array.size and array.min() < 0:
        raise DatasetError(f"{path}: negative index {array.min()}")
    return array.astype(np.int64)


def _read(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".txt":
        return [int(t) for t in path.read_text().replace(",", " ").split()]
    if suffix in (".pth", ".pt"):
        from dpiqa_jax.weights import torch_files  # torch only for the authors' files

        return torch_files.to_numpy(torch_files.load_pickle(path))
    raise DatasetError(f"{path}: unknown index file type {suffix!r} (use .npy, .txt, .json or .pth)")
