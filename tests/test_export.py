"""Student exports: every format reloads to the model's scores; our weight files refuse tampering;
the StableHLO bytes run with jax and numpy alone. The export command: test_predict_cli.py."""
import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import serialization
from safetensors import safe_open

from dpiqa_jax import export as export_lib
from dpiqa_jax.errors import UserError
from dpiqa_jax.export import ExportError, export_student
from dpiqa_jax.models.efficientnet import get_variant
from dpiqa_jax.models.student import Student
from dpiqa_jax.student_io import (
    MANIFEST_KEY,
    StudentSpec,
    load_student,
    save_msgpack,
    student_apply,
    student_state_dict,
)
from dpiqa_jax.weights.torch_names import WeightsError

SPEC = StudentSpec("b0", image_size=64)
SUFFIX = {"msgpack": ".msgpack", "safetensors": ".safetensors", "stablehlo": ".stablehlo", "savedmodel": ""}


@functools.lru_cache(maxsize=None)
def random_student_variables(spec: StudentSpec, seed: int = 0) -> dict:
    """Random weights at a trained network's scale, with running statistics calibrated on random
    images: arbitrary statistics make a random network's output independent of its input (see
    test_efficientnet.calibrate_batch_norms_), which would let a comparison of scores pass blindly.
    Cached (its compile takes seconds): callers share the arrays and must not modify them."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape, np.float32)
        if path[-1].key == "scale":
            return 1 + 0.1 * noise
        if leaf.ndim >= 2:
            return noise / np.float32(np.sqrt(leaf.size / leaf.shape[-1]))  # 1 / sqrt(fan in)
        return 0.1 * noise

    shapes = spec.variable_shapes()
    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    params["fc3"]["bias"] = np.full((1,), 0.6, np.float32)  # scores near a normalised MOS
    # From zero running statistics, one training pass leaves momentum * (the batch statistics).
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), shapes["batch_stats"])
    model = Student(spec.variant, spec.map_channels, spec.fc_width, stochastic_depth_prob=0.0)
    images = rng.random((16, spec.image_size, spec.image_size, 3), np.float32)
    _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        {"params": params, "batch_stats": zeros}, images)
    momentum = get_variant(spec.variant).bn_momentum
    batch_stats = jax.tree.map(lambda s: np.asarray(s) / momentum, updated["batch_stats"])
    return {"params": params, "batch_stats": batch_stats}


def write_authors_student(path, variables) -> None:
    """A student state dict saved the authors' way: torch.save of {PyTorch name: tensor}."""
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in student_state_dict(variables).items()}, path)


def model_scores(variables, images) -> np.ndarray:
    return np.asarray(student_apply(SPEC)(variables, images)[0])


@pytest.fixture(scope="module")
def student():
    variables = random_student_variables(SPEC)
    images = np.random.default_rng(1).random((3, 64, 64, 3), np.float32)
    scores = model_scores(variables, images)
    assert np.ptp(scores) > 1e-3 * np.abs(scores).max()  # the scores depend on the image
    return variables, images, scores


def exported(tmp_path, student, fmt):
    path = tmp_path / f"student{SUFFIX[fmt]}"
    assert export_student(SPEC, student[0], fmt, path) <= export_lib.TOLERANCE[fmt]
    return path


def assert_same_variables(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors"])
def test_weight_exports_reload_exactly(tmp_path, student, fmt):
    path = exported(tmp_path, student, fmt)
    spec, variables = load_student(path)
    assert spec == SPEC
    assert_same_variables(variables, student[0])
    np.testing.assert_array_equal(model_scores(variables, student[1]), student[2])


def test_safetensors_export_loads_into_the_authors_pytorch_student(tmp_path, student):
    from oracle import nchw
    from test_student import TorchStudent

    _, images, scores = student
    state = safetensors.numpy.load_file(str(exported(tmp_path, student, "safetensors")))
    reference = TorchStudent("b0", map_size=8, fc_width=512).eval()
    # strict: every key and shape matches (BatchNorm fills in the batch counters we do not keep).
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        actual = reference(torch.from_numpy(nchw(images)))[0][:, 0].numpy()
    assert export_lib.max_rel_error(actual, scores) <= 1e-4


def test_stablehlo_runs_with_jax_and_numpy_only(tmp_path, student):
    _, images, scores = student
    path = exported(tmp_path, student, "stablehlo")
    np.save(tmp_path / "images.npy", images)
    script = __file__.replace("test_export.py", "stablehlo_load_script.py")
    result = subprocess.run([sys.executable, script, path, tmp_path / "images.npy", tmp_path / "scores.npy"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = np.concatenate([scores[:1], scores])  # a batch of 1, then of 3
    assert export_lib.max_rel_error(np.load(tmp_path / "scores.npy"), expected) <= 1e-4


def test_savedmodel_serving_signature(tmp_path, student):
    import tensorflow as tf

    _, images, scores = student
    serve = tf.saved_model.load(str(exported(tmp_path, student, "savedmodel"))).signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.name == "images" and spec.shape.as_list() == [None, 64, 64, 3]
    for batch in (slice(0, 1), slice(0, 3)):
        actual = serve(images=tf.constant(images[batch]))["scores"].numpy()
        assert export_lib.max_rel_error(actual, scores[batch]) <= 1e-4


def test_export_refuses_a_file_that_does_not_reload_to_the_model(tmp_path, student, monkeypatch):
    def save_perturbed(spec, variables, path):
        fc3 = {**variables["params"]["fc3"], "bias": variables["params"]["fc3"]["bias"] + 1e-3}
        save_msgpack(spec, {**variables, "params": {**variables["params"], "fc3": fc3}}, path)

    monkeypatch.setitem(export_lib.WRITERS, "msgpack", save_perturbed)
    with pytest.raises(ExportError, match="max rel error"):
        export_student(SPEC, student[0], "msgpack", tmp_path / "student.msgpack")
    with pytest.raises(UserError, match=r"student.bin: a msgpack export must end in \.msgpack$"):
        export_student(SPEC, student[0], "msgpack", tmp_path / "student.bin")


# --- tampering ---------------------------------------------------------------------------------

def rewrite_manifest(path, edit) -> None:
    """Apply `edit` to the manifest of one of our files, leaving its tensors as they are."""
    if path.suffix == ".msgpack":
        content = serialization.msgpack_restore(path.read_bytes())
        manifest = json.loads(content[MANIFEST_KEY])
        edit(manifest)
        path.write_bytes(serialization.msgpack_serialize({**content, MANIFEST_KEY: json.dumps(manifest)}))
    else:
        with safe_open(str(path), "numpy") as f:
            manifest = json.loads(f.metadata()[MANIFEST_KEY])
        edit(manifest)
        tensors = safetensors.numpy.load_file(str(path))
        safetensors.numpy.save_file(tensors, str(path), metadata={MANIFEST_KEY: json.dumps(manifest)})


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors"])
def test_a_changed_byte_fails_the_sha256(tmp_path, student, fmt):
    path = exported(tmp_path, student, fmt)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # both formats end with tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch") as error:
        load_student(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("fmt,key", [("msgpack", "params/fc2/kernel"), ("safetensors", "fc2.weight")])
def test_a_wrong_shape_in_the_manifest_names_the_key(tmp_path, student, fmt, key):
    path = exported(tmp_path, student, fmt)
    rewrite_manifest(path, lambda m: m["tensors"][key].update(shape=[512, 3]))
    with pytest.raises(UserError) as error:
        load_student(path)
    message = str(error.value)
    assert str(path) in message and f"{key} (file (512, 512) float32, manifest (512, 3) float32)" in message


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors"])
def test_a_manifest_spec_that_does_not_fit_the_tensors_names_the_keys(tmp_path, student, fmt):
    path = exported(tmp_path, student, fmt)
    rewrite_manifest(path, lambda m: m["student"].update(image_size=128))
    with pytest.raises(WeightsError) as error:
        load_student(path)
    assert str(path) in str(error.value)
    assert "fc1.weight (file (512, 512), model (512, 2048))" in str(error.value)


def test_a_requested_spec_must_agree_with_the_manifest(tmp_path, student):
    path = exported(tmp_path, student, "msgpack")
    assert load_student(path, SPEC)[0] == SPEC
    with pytest.raises(UserError, match="not the requested"):
        load_student(path, StudentSpec("b0", image_size=128))


def test_a_msgpack_without_manifest_is_refused(tmp_path, student):
    path = tmp_path / "plain.msgpack"
    path.write_bytes(serialization.to_bytes(student[0]))
    with pytest.raises(UserError, match="no manifest"):
        load_student(path)


def test_a_workdir_of_the_other_model_is_named_for_what_it_is(tmp_path):
    """A teacher's workdir given to export (or a student's as distill's --teacher): the error says
    which kind of workdir it is, not that it is none."""
    from dpiqa_jax import checkpoints
    from dpiqa_jax.student_io import load_student

    for name in (checkpoints.MODEL_FILE, checkpoints.STUDENT_FILE):
        (tmp_path / name.split(".")[0]).mkdir()
        (tmp_path / name.split(".")[0] / name).write_text("{}")
    with pytest.raises(UserError, match=r"'.*/model' is a teacher's workdir \(model.json\); this command "
                                        r"takes a student's here"):
        load_student(tmp_path / "model")
    with pytest.raises(UserError, match=r"'.*/student' is a student's workdir \(student.json\); this command "
                                        r"takes a teacher's here"):
        checkpoints.resolve(str(tmp_path / "student"))
