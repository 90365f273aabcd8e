"""Import the student's weights: torchvision's ImageNet EfficientNet and the authors' student.

Both are PyTorch state dicts (`.pth`, read with `torch.load(weights_only=True)`) or safetensors
files, read by `torch_files` (torch is imported only for a `.pth`). Names map by `torch_names`;
the batch-norm running statistics fill the `batch_stats` collection.
"""
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from dpiqa_jax.models.efficientnet import EfficientNet
from dpiqa_jax.models.student import Student
from dpiqa_jax.weights.torch_files import read_tensors
from dpiqa_jax.weights.torch_names import load_state_dict

Variables = dict[str, Any]


def load_variables(shapes: Variables, state: Mapping[str, np.ndarray], prefix: str = "",
                   source: str = "state dict") -> Variables:
    """`load_state_dict` for all collections at once (`params`, `batch_stats`), so that one error
    names every bad key. Collections share module paths but not leaf names (scale/bias vs mean/var)."""
    collection_of, merged = {}, {}
    for collection, tree in shapes.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            collection_of[path], merged[path] = collection, leaf
    loaded = load_state_dict(traverse_util.unflatten_dict(merged), state, prefix, source)
    out = {collection: {} for collection in shapes}
    for path, value in traverse_util.flatten_dict(loaded).items():
        out[collection_of[path]][path] = value
    return {collection: traverse_util.unflatten_dict(flat) for collection, flat in out.items()}


def _shapes(model, image_size: int) -> Variables:
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


def load_torchvision_efficientnet(path, variant: str = "b7") -> Variables:
    """torchvision's `efficientnet_{variant}` state dict (ImageNet weights) -> the variables
    (`params`, `batch_stats`) of `EfficientNet(variant)`, i.e. of a Student's `base_model`.
    The classifier's keys are ignored."""
    return load_variables(_shapes(EfficientNet(variant), 32), read_tensors(str(path)), source=str(path))


def load_student_pth(path, model: Optional[Student] = None, image_size: int = 512) -> Variables:
    """The authors' student state dict (`base_model.features.*`, `conv_transpose.*`, `fc1..3.*`) ->
    the variables of `model` (default `Student()`, B7). `image_size` fixes fc1's input width
    (8 * (image_size / 8) ** 2)."""
    model = Student() if model is None else model
    return load_variables(_shapes(model, image_size), read_tensors(str(path)), source=str(path))


def with_base_model(variables: Variables, base: Variables) -> Variables:
    """Student `variables` with `base_model` replaced by `base` (e.g. ImageNet weights to distil from)."""
    return {collection: {**tree, "base_model": base[collection]} for collection, tree in variables.items()}
