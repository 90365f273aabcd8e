"""The input pipeline: host-local numpy batches from a prepared dataset, and their global arrays.

Order first, then work. The sequence of images is a pure function of (split, seed, step): epoch
e visits the train indices in a hash order keyed by (seed, e), global batch t takes the next
`batch_size` of them (an epoch's remainder is dropped), and process p keeps its contiguous share.
So a run resumed at step t sees exactly the batches an uninterrupted run would, every process
agrees on the global batch without talking, and each process reads only its own images.

The work is `images.load_image` itself, on a pool of threads (PIL releases the GIL while it
decodes and resizes) reading records by index (ArrayRecord random access), a bounded number of
batches ahead. Not tf.data: every step of it is Python (ArrayRecord, PIL), so tf.data would only
wrap the same threads in `numpy_function`, and a tf.data iterator over a Python function that is
still alive when the interpreter exits (a finished script, an error mid-epoch) hangs the exit.
"""
import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional, Sized, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.data.images import load_image
from dpiqa_jax.data.source import Source, open_source
from dpiqa_jax.data.splits import SplitSpec, hash_order, resolve

PAD = -1  # index of an evaluation padding slot


class TrainOrder:
    """The global batch of each step: epoch e = step // (n // batch_size) visits `indices` in hash
    order (seed, e); the remainder of each epoch is dropped."""

    def __init__(self, indices: np.ndarray, seed: int, batch_size: int):
        self.per_epoch = len(indices) // batch_size
        if self.per_epoch == 0:
            raise DatasetError(f"the train split has {len(indices)} images, fewer than one batch of "
                               f"{batch_size}")
        self._indices, self._seed, self._batch_size = np.asarray(indices, np.int64), seed, batch_size
        self._epoch, self._order = None, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, position = divmod(int(step), self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, hash_order(self._indices, self._seed, epoch)
        return self._order[position * self._batch_size:(position + 1) * self._batch_size]


def eval_order(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Global batches of `indices` in order, the last padded with PAD: every image exactly once."""
    padded = -(-len(indices) // batch_size) * batch_size
    keys = np.full(padded, PAD, np.int64)
    keys[:len(indices)] = np.sort(indices)
    return [keys[i:i + batch_size] for i in range(0, padded, batch_size)]


def _loader(source: Source, image_size: int, masked: bool, **image_options):
    """index -> {image, target, index[, mask]} by load_image; a PAD index gives a masked blank."""
    blank = np.zeros((image_size, image_size, 3), image_options.get("dtype", np.float32))

    def load(index) -> dict:
        index = int(index)
        if index == PAD:
            return {"image": blank, "target": np.float32(0), "index": np.int32(PAD), "mask": np.float32(0)}
        record = source[index]
        name = f"{source.name} {record['file_name'].decode()}"
        example = {"image": load_image(record["image"], image_size, name=name, **image_options),
                   "target": np.float32(record["target"]), "index": np.int32(index)}
        return {**example, "mask": np.float32(1)} if masked else example

    return load


class ParallelBatches:
    """Ordered parallel loading: the examples of the next `prefetch` batches of `keys` (an iterable
    of index arrays) load on a pool of threads and are stacked into numpy batches in order; memory
    stays bounded by `prefetch` batches. An error while loading is raised by `next`."""

    def __init__(self, keys: Iterable[np.ndarray], load, threads: Optional[int] = None, prefetch: int = 2):
        self.count = len(keys) if isinstance(keys, Sized) else None  # the number of batches, if known
        self._keys, self._load, self._prefetch = iter(keys), load, max(1, prefetch)
        threads = threads or len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dpiqa-data")
        self._pending: collections.deque = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch:
            keys = next(self._keys, None)
            if keys is None:
                return
            self._pending.append([self._pool.submit(self._load, key) for key in keys])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._pending:
            self.close()
            raise StopIteration
        futures = self._pending.popleft()
        self._fill()
        examples = [f.result() for f in futures]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

    def close(self) -> None:
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class TrainBatches:
    """Infinite host-local train batches {'image', 'target', 'index'}; resumable: `state()` is the
    position (the number of batches handed out) and `restore(state)` continues from there."""

    def __init__(self, source: Source, indices: np.ndarray, *, batch_size: int, image_size: int, seed: int,
                 process_index: int, process_count: int, step: int = 0, threads: Optional[int] = None,
                 prefetch: int = 2, **image_options):
        local = _local_batch(batch_size, process_count)
        self._order = TrainOrder(indices, seed, batch_size)
        self._share = slice(process_index * local, (process_index + 1) * local)
        self._load = _loader(source, image_size, False, **image_options)
        self._threads, self._prefetch = threads, prefetch
        self._batches: Optional[ParallelBatches] = None
        self.restore({"step": step})

    def _keys(self, step: int) -> Iterator[np.ndarray]:
        while True:
            yield self._order(step)[self._share]
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.close()
        self.step = int(state["step"])
        self._batches = ParallelBatches(self._keys(self.step), self._load, self._threads, self._prefetch)

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise DatasetError(f"process index {index} is not in [0, {count})")
    return index, count


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise DatasetError(f"batch size {batch_size} must be a positive multiple of the {process_count} "
                           "processes")
    return batch_size // process_count


def _setup(name, split, data_dir, manual_dir, process_index, process_count):
    process_index, process_count = _processes(process_index, process_count)
    source = open_source(name, data_dir, manual_dir, process_count)
    return source, resolve(split, source.parts, source.name), process_index, process_count


def train_batches(name, split: Union[str, SplitSpec] = "random", *, batch_size: int, image_size: int = 512,
                  seed: int = 0, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  start_step: int = 0, threads: Optional[int] = None, prefetch: int = 2, draft: bool = True,
                  exif: bool = True, image_dtype: str = "float32") -> TrainBatches:
    """Infinite host-local batches {'image': float32 (b, S, S, 3), 'target': float32 (b,), 'index':
    int32 (b,)} of the train part of `split` (splits.py), b = batch_size (global) / process_count;
    shuffled per epoch by `seed`, each epoch's remainder dropped; `start_step` resumes a run.
    Prepares the dataset first if needed (single process only). `threads` defaults to the cores
    this process may use; `draft` and `exif` go to load_image. `image_dtype='uint8'` gives the
    levels 0-255 instead, for `to_global` to divide on the devices."""
    source, parts, index, count = _setup(name, split, data_dir, manual_dir, process_index, process_count)
    return TrainBatches(source, parts["train"], batch_size=batch_size, image_size=image_size, seed=seed,
                        process_index=index, process_count=count, step=start_step, threads=threads,
                        prefetch=prefetch, draft=draft, exif=exif, dtype=np.dtype(image_dtype))


def eval_batches(name, split: Union[str, SplitSpec] = "random", *, batch_size: int, part: str = "test",
                 image_size: int = 512, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 threads: Optional[int] = None, prefetch: int = 2, draft: bool = True,
                 exif: bool = True, image_dtype: str = "float32") -> ParallelBatches:
    """Host-local batches of `part` of `split`, as train_batches plus 'mask' (1 for an image, 0 for
    padding): the last global batch is padded, so that over all processes and devices every image
    is scored exactly once. Every process gets the same number of batches."""
    source, parts, index, count = _setup(name, split, data_dir, manual_dir, process_index, process_count)
    if part not in parts:
        raise DatasetError(f"{source.name} split {split}: no part {part!r} (parts: {sorted(parts)})")
    local = _local_batch(batch_size, count)
    share = slice(index * local, (index + 1) * local)
    keys = [batch[share] for batch in eval_order(parts[part], batch_size)]
    load = _loader(source, image_size, True, draft=draft, exif=exif, dtype=np.dtype(image_dtype))
    return ParallelBatches(keys, load, threads, prefetch)


def to_global(batch: dict, mesh: Mesh, axis: Union[str, tuple[str, ...]] = "data") -> dict:
    """Host-local numpy batches -> jax global arrays whose batch dimension is sharded over `axis`
    (a mesh axis name or a tuple of them, e.g. ('data', 'fsdp')). uint8 images (`image_dtype`)
    cross to the devices as bytes, a quarter of the host memory traffic and transfer, and are
    scaled to [0, 1] there."""
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    arrays = {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
              for key, value in batch.items()}
    if "image" in arrays and arrays["image"].dtype == np.uint8:
        arrays["image"] = _unit_range(arrays["image"])
    return arrays


@jax.jit
def _unit_range(levels: jax.Array) -> jax.Array:
    # XLA turns a division by a constant into a multiplication by its reciprocal: half of the
    # levels then land one float32 step (<= 6e-8) from load_image's level / 255. Written as that
    # multiplication, it is the same on every backend; a table lookup would be exact but gathers
    # 12 M elements a batch, which TPUs do slowly.
    return levels.astype(np.float32) * np.float32(1 / 255)
