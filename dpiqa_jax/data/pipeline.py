"""The input pipeline: host-local numpy batches from a prepared dataset, and their global arrays.

Order first, then work. The sequence of images is a pure function of (split, seed, step): epoch
e visits the train indices in a hash order keyed by (seed, e), global batch t takes the next
`batch_size` of them (an epoch's remainder is dropped), and process p keeps its contiguous share.
So a run resumed at step t sees exactly the batches an uninterrupted run would, every process
agrees on the global batch without talking, and each process reads only its own images.
tf.data then does the work: records are read by index (ArrayRecord random access) and decoded
by `images.load_image` itself in parallel threads (PIL releases the GIL while decoding and
resizing), batched and prefetched.
"""
from typing import Iterator, Optional, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpiqa_jax.data.errors import DatasetError
from dpiqa_jax.data.images import load_image
from dpiqa_jax.data.source import Source, open_source
from dpiqa_jax.data.splits import SplitSpec, hash_order, resolve

PAD = -1  # index of an evaluation padding slot


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise DatasetError(f"process index {index} is not in [0, {count})")
    return index, count


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise DatasetError(f"batch size {batch_size} must be a positive multiple of the {process_count} processes")
    return batch_size // process_count


class TrainOrder:
    """The global batch of each step: epoch e = step // (n // batch_size) visits `indices` in hash
    order (seed, e); the remainder of each epoch is dropped."""

    def __init__(self, indices: np.ndarray, seed: int, batch_size: int):
        self.per_epoch = len(indices) // batch_size
        if self.per_epoch == 0:
            raise DatasetError(f"the train split has {len(indices)} images, fewer than one batch of {batch_size}")
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


def _loader(source: Source, image_size: int, **image_options):
    """index -> (image, target, index, mask) with load_image; a PAD index gives a masked blank."""
    blank = np.zeros((image_size, image_size, 3), np.float32)

    def load(index):
        index = int(index)
        if index == PAD:
            return blank, np.float32(0), np.int32(PAD), np.float32(0)
        record = source[index]
        image = load_image(record["image"], image_size, name=f"{source.name} {record['file_name']}",
                           **image_options)
        return image, np.float32(record["target"]), np.int32(index), np.float32(1)

    return load


def _batches(keys, load, image_size: int, local_batch: int, prefetch: int, with_mask: bool):
    """tf.data: the dataset of indices `keys` -> parallel load -> batch -> prefetch, as numpy dicts."""
    import tensorflow as tf


    def fetch(key):
        image, target, index, mask = tf.numpy_function(load, [key], (tf.float32, tf.float32, tf.int32, tf.float32),
                                                       stateful=False)
        image.set_shape((image_size, image_size, 3))
        example = {"image": image, "target": tf.ensure_shape(target, ()), "index": tf.ensure_shape(index, ())}
        if with_mask:
            example["mask"] = tf.ensure_shape(mask, ())
        return example

    dataset = keys.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(prefetch)
    return dataset.as_numpy_iterator()


class TrainBatches:
    """Infinite host-local train batches {'image', 'target', 'index'}; resumable: `state()` gives
    the position (the number of batches handed out) and `restore(state)` continues from there."""

    def __init__(self, source: Source, indices: np.ndarray, *, batch_size: int, image_size: int, seed: int,
                 process_index: int, process_count: int, step: int = 0, prefetch: int = 2, **image_options):
        self._local = _local_batch(batch_size, process_count)
        self._order = TrainOrder(indices, seed, batch_size)
        self._share = slice(process_index * self._local, (process_index + 1) * self._local)
        self._load = _loader(source, image_size, **image_options)
        self._image_size, self._prefetch = image_size, prefetch
        self.restore({"step": step})

    def _keys(self, step) -> np.ndarray:
        return self._order(step)[self._share]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        import tensorflow as tf

        self.step = int(state["step"])
        steps = tf.data.Dataset.counter(self.step)  # keys are computed in order, one step at a time
        keys = steps.map(lambda t: tf.numpy_function(self._keys, [t], tf.int64, stateful=False)).unbatch()
        self._iterator = _batches(keys, self._load, self._image_size, self._local, self._prefetch, False)


def _setup(name, split, data_dir, manual_dir, process_index, process_count):
    process_index, process_count = _processes(process_index, process_count)
    source = open_source(name, data_dir, manual_dir, process_count)
    return source, resolve(split, source.parts, source.name), process_index, process_count


def train_batches(name, split: Union[str, SplitSpec] = "random", *, batch_size: int, image_size: int = 512,
                  seed: int = 0, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None, start_step: int = 0,
                  prefetch: int = 2, draft: bool = True, exif: bool = True) -> TrainBatches:
    """Infinite host-local batches {'image': float32 (b, S, S, 3), 'target': float32 (b,), 'index':
    int32 (b,)} of the train part of `split`, b = batch_size (global) / process_count; shuffled per
    epoch by `seed`, remainders dropped. Prepares the dataset first if needed (single process).
    `draft` and `exif` go to load_image."""
    source, parts, index, count = _setup(name, split, data_dir, manual_dir, process_index, process_count)
    return TrainBatches(source, parts["train"], batch_size=batch_size, image_size=image_size, seed=seed,
                        process_index=index, process_count=count, step=start_step, prefetch=prefetch,
                        draft=draft, exif=exif)


def eval_batches(name, split: Union[str, SplitSpec] = "random", *, batch_size: int, part: str = "test",
                 image_size: int = 512, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None, prefetch: int = 2,
                 draft: bool = True, exif: bool = True) -> Iterator[dict]:
    """Host-local batches of `part` of `split` with 'mask' (1 for an image, 0 for padding): the
    last global batch is padded, so over all processes and devices every image is scored exactly
    once. Every process gets the same number of batches."""
    source, parts, index, count = _setup(name, split, data_dir, manual_dir, process_index, process_count)
    if part not in parts:
        raise DatasetError(f"{source.name} split {split}: no part {part!r} (parts: {sorted(parts)})")
    local = _local_batch(batch_size, count)
    share = slice(index * local, (index + 1) * local)
    keys = np.concatenate([batch[share] for batch in eval_order(parts[part], batch_size)])
    load = _loader(source, image_size, draft=draft, exif=exif)
    import tensorflow as tf

    return _batches(tf.data.Dataset.from_tensor_slices(keys), load, image_size, local, prefetch, True)


def to_global(batch: dict, mesh: Mesh, axis: Union[str, tuple[str, ...]] = "data") -> dict:
    """Host-local numpy batches -> jax global arrays whose batch dimension is sharded over `axis`."""
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items()}
