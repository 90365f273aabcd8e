"""The run's data: the pipeline's host-local batches turned into global arrays on the mesh."""
from typing import Callable, Iterator, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dpiqa_jax.data import pipeline
from dpiqa_jax.data.source import open_source
from dpiqa_jax.data.splits import resolve
from dpiqa_jax.train import mesh as mesh_lib


def train_fields(image_size: int, joined: dict[str, tuple]) -> dict[str, tuple]:
    """One train example as the train step takes it, name -> (shape, dtype): the image (scaled to
    [0, 1] on the devices), its target and index, and the float32 fields `joined` (name -> shape)
    that a join adds."""
    fields = {"image": ((image_size, image_size, 3), np.float32), "target": ((), np.float32),
              "index": ((), np.int32)}
    return fields | {name: (shape, np.float32) for name, shape in joined.items()}


class IQAData:
    """Train batches (resumable by step) and the eval split, from the config's `dataset` group."""

    def __init__(self, config: ml_collections.ConfigDict, image_size: int, mesh: Mesh):
        ds = config.dataset
        self.mesh, self.image_size = mesh, image_size
        self.batch_size, self.eval_batch_size = config.batch_size, config.eval.batch_size
        self.seed = config.seed
        mesh_lib.batch_size_per_process(mesh, self.batch_size, "batch_size")
        mesh_lib.batch_size_per_process(mesh, self.eval_batch_size, "eval.batch_size")
        self.where = {"data_dir": ds.data_dir, "manual_dir": ds.manual_dir}
        self.name, self.split = ds.name, ds.split
        source = open_source(ds.name, process_count=jax.process_count(), skip_bad_images=ds.skip_bad_images,
                             **self.where)
        parts = resolve(ds.split, source.parts, source.name)
        self.train_indices = parts["train"]
        self.num_train, self.num_eval = len(parts["train"]), len(parts["test"])
        # a split smaller than one batch is an error here, before any compile
        self.steps_per_epoch = pipeline.TrainOrder(self.train_indices, self.seed, self.batch_size).per_epoch

    def train_batches(self, start_step: int, join: Optional[Callable[[dict], dict]] = None) -> Iterator[dict]:
        """Global train batches from `start_step` on: the same sequence on any mesh, after any resume.
        `join` adds fields to each host-local batch (e.g. cached teacher maps)."""
        batches = pipeline.train_batches(self.name, self.split, batch_size=self.batch_size,
                                         image_size=self.image_size, seed=self.seed, start_step=start_step,
                                         image_dtype="uint8", **self.where)
        try:
            for batch in batches:
                yield pipeline.to_global(join(batch) if join else batch, self.mesh, mesh_lib.BATCH_AXES)
        finally:  # the loader's threads stop with the generator
            batches.close()

    def train_spec(self, joined: dict[str, tuple]) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes, dtypes and shardings of a global train batch, with the float32 fields of
        `joined` (name -> one example's shape) that a join adds: what the train step is compiled for."""
        split = mesh_lib.batch_sharding(self.mesh)
        return {name: jax.ShapeDtypeStruct((self.batch_size, *shape), dtype, sharding=split)
                for name, (shape, dtype) in train_fields(self.image_size, joined).items()}

    def eval_batches(self, part: str = "test") -> Iterator[dict]:
        """A part of the split (each image once, in order), padded with a 'mask', as global arrays."""
        batches = pipeline.eval_batches(self.name, self.split, batch_size=self.eval_batch_size, part=part,
                                        image_size=self.image_size, image_dtype="uint8", **self.where)
        return (pipeline.to_global(batch, self.mesh, mesh_lib.BATCH_AXES) for batch in batches)
