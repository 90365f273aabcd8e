"""Exporting a student: its weights (msgpack, safetensors) or its inference function (StableHLO through
`jax.export`, a TensorFlow SavedModel through jax2tf).

The compiled formats take images (B, S, S, 3) float32 in [0, 1], B symbolic, S = spec.image_size, and
return the scores (B,) in eval mode. Each export is reloaded and its scores compared with the
in-memory model's before `export_student` returns.

    import jax, numpy as np
    exported = jax.export.deserialize(bytearray(open("student.stablehlo", "rb").read()))
    scores = exported.call(images)
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from dpiqa_jax import outputs, tf_runtime
from dpiqa_jax.errors import UserError
from dpiqa_jax.student_io import (
    StudentSpec,
    Variables,
    load_student,
    save_msgpack,
    save_safetensors,
    student_apply,
)

# Weight files reload the very arrays; compiled programs may fuse and reorder float operations.
TOLERANCE = {"msgpack": 1e-5, "safetensors": 1e-5, "stablehlo": 1e-4, "savedmodel": 1e-4}
SUFFIX = {"msgpack": ".msgpack", "safetensors": ".safetensors"}  # load_student tells them by suffix
PLATFORMS = ("cpu", "cuda")  # what the compiled formats run on, whatever machine exports them
CHECK_IMAGES = 3


class ExportError(UserError):
    """An export whose reloaded scores differ from the model's."""


def _score_fn(spec: StudentSpec, variables: Variables):
    apply = student_apply(spec)
    return lambda images: apply(variables, images)[0]


def save_stablehlo(spec: StudentSpec, variables: Variables, path: str) -> None:
    """`jax.export` of the scores, the weights folded in as constants, with a symbolic batch."""
    (batch,) = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct((batch, spec.image_size, spec.image_size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(_score_fn(spec, variables)), platforms=PLATFORMS)(images)
    with open(path, "wb") as f:
        f.write(exported.serialize())


def save_savedmodel(spec: StudentSpec, variables: Variables, path: str) -> None:
    """A SavedModel whose `serving_default` maps `images` (None, S, S, 3) to `scores` (None,). The
    weights are tf.Variables rather than graph constants, which a GraphDef caps at 2 GB."""
    from jax.experimental import jax2tf

    tf = tf_runtime.tensorflow()

    leaves, treedef = jax.tree_util.tree_flatten(variables)
    apply = student_apply(spec)
    side = spec.image_size
    convert = jax2tf.convert(lambda ws, images: apply(jax.tree_util.tree_unflatten(treedef, ws), images)[0],
                             polymorphic_shapes=[None, f"(b, {side}, {side}, 3)"], with_gradient=False,
                             native_serialization_platforms=PLATFORMS)
    module = tf.Module()
    module.weights = [tf.Variable(np.asarray(leaf), trainable=False) for leaf in leaves]
    serve = tf.function(lambda images: {"scores": convert(module.weights, images)}, autograph=False,
                        input_signature=[tf.TensorSpec((None, side, side, 3), tf.float32, name="images")])
    tf.saved_model.save(module, path, signatures={"serving_default": serve.get_concrete_function()})


def _reloaded_scores(spec: StudentSpec, fmt: str, path: str, images: np.ndarray) -> np.ndarray:
    if fmt in SUFFIX:
        reloaded_spec, variables = load_student(path)
        if reloaded_spec != spec:
            raise ExportError(f"{path}: reloads as {reloaded_spec}, not {spec}")
        return np.asarray(_score_fn(spec, variables)(images))
    if fmt == "stablehlo":
        with open(path, "rb") as f:
            return np.asarray(jax.export.deserialize(bytearray(f.read())).call(images))
    tf = tf_runtime.tensorflow()
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return serve(images=tf.constant(images))["scores"].numpy()


def max_rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """The largest score difference over the largest score magnitude (a score near 0 alone would
    make a per-score ratio meaningless)."""
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale


WRITERS = {"msgpack": save_msgpack, "safetensors": save_safetensors, "stablehlo": save_stablehlo,
           "savedmodel": save_savedmodel}
FORMATS = tuple(WRITERS)


def export_student(spec: StudentSpec, variables: Variables, fmt: str, output) -> float:
    """Write the student in format `fmt` to `output` (a folder for savedmodel), reload it and compare its
    scores with the model's on a few random images. Returns the max relative error; raises ExportError
    above TOLERANCE[fmt]."""
    output = os.fspath(output)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt == "savedmodel":
        outputs.folder(output, "SavedModel folder")
    else:
        outputs.file(output, (SUFFIX[fmt],) if fmt in SUFFIX else (), f"a {fmt} export")
    WRITERS[fmt](spec, variables, output)
    side = spec.image_size
    images = np.random.default_rng(0).random((CHECK_IMAGES, side, side, 3), np.float32)
    expected = np.asarray(_score_fn(spec, variables)(images), np.float64)
    error = max_rel_error(_reloaded_scores(spec, fmt, output, images), expected)
    if not error <= TOLERANCE[fmt]:
        raise ExportError(f"{output}: the reloaded {fmt} export's scores differ from the model's "
                          f"(max rel error {error:.2e} > {TOLERANCE[fmt]:.0e})")
    return error
