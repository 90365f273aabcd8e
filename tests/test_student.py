"""The Flax student against a PyTorch student assembled from SPEC.md, and its importers."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision
from oracle import nchw, nhwc, randomize_, rel_err, state_numpy
from test_efficientnet import calibrate_batch_norms_, flax_variables, random_images
from torch import nn
from torch_reference import TorchStudent

from dpiqa_jax.models.efficientnet import EfficientNet
from dpiqa_jax.models.student import ConvTranspose2d, Student
from dpiqa_jax.weights.student import load_student_pth, load_torchvision_efficientnet, with_base_model
from dpiqa_jax.weights.torch_names import WeightsError, to_state_dict

TOL = 1e-4
AUTHORS_KEYS = re.compile(r"base_model\.features\.\d+\..+|(conv_transpose|fc[123])\.(weight|bias)")
TINY = {"variant": "b0", "fc_width": 16}  # 64-px images: 2x2 EfficientNet features, an 8x8 map


@pytest.fixture(scope="module")
def torch_student():
    model = randomize_(TorchStudent("b0", map_size=8, fc_width=16))
    with torch.no_grad():
        # Scores in the normalised-MOS range, as a trained student's: a relative error means
        # little for a score near zero.
        model.fc3.bias.fill_(0.6)
    return calibrate_batch_norms_(model, random_images(16))


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 1, 1), (2, 0, 0), (1, 1, 0), (3, 2, 2)])
def test_conv_transpose_matches_torch(stride, padding, output_padding):
    ref = randomize_(nn.ConvTranspose2d(6, 5, 3, stride, padding, output_padding))
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        expected = ref(x).numpy()
    ours, xj = ConvTranspose2d(5, 3, stride, padding, output_padding), jnp.asarray(nhwc(x.numpy()))
    params = jax.eval_shape(ours.init, jax.random.PRNGKey(0), xj)["params"]
    assert params["weight"].shape == tuple(ref.weight.shape)  # PyTorch's own layout
    actual = ours.apply({"params": state_numpy(ref)}, xj)
    assert rel_err(nchw(actual), expected) < TOL


def test_state_dict_keys_follow_the_authors(torch_student):
    keys = list(torch_student.state_dict())
    assert [k for k in keys if not AUTHORS_KEYS.fullmatch(k)] == []
    assert {"conv_transpose.weight", "fc1.weight", "fc3.bias", "base_model.features.0.0.weight"} <= set(keys)


def test_student_parity_through_a_saved_state_dict(torch_student, tmp_path):
    path = tmp_path / "student.pth"
    torch.save(torch_student.state_dict(), path)
    model = Student(**TINY)
    variables = load_student_pth(path, model, image_size=64)
    x = random_images()
    with torch.no_grad():
        expected_score, expected_map = (t.numpy() for t in torch_student(x))
    assert rel_err(expected_map[0], expected_map[1]) > 0.1  # the oracle's output depends on its input
    score, feature_map = jax.jit(model.apply)(variables, jnp.asarray(nhwc(x.numpy())))
    assert score.shape == (2,) and feature_map.shape == (2, 8, 8, 8)
    errors = rel_err(score, expected_score[:, 0]), rel_err(nchw(feature_map), expected_map)
    print(f"student score rel err {errors[0]:.2e}, feature map rel err {errors[1]:.2e}")
    assert max(errors) < TOL
    # Back to PyTorch names: the same state dict, less the batch counters the model does not keep.
    state = state_numpy(torch_student)
    back = {**to_state_dict(variables["params"]), **to_state_dict(variables["batch_stats"])}
    assert set(back) == {k for k in state if not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(back[k], state[k]) for k in back)


def test_bad_student_files_name_every_bad_key(torch_student, tmp_path):
    state = dict(torch_student.state_dict())
    del state["fc2.bias"], state["base_model.features.1.0.block.0.1.running_var"]
    state["fc1.weight"] = torch.zeros(16, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_student_pth(path, Student(**TINY), image_size=64)
    message = str(error.value)
    assert str(path) in message and "fc2.bias" in message
    assert "fc1.weight (file (16, 3), model (16, 512))" in message
    assert "base_model.features.1.0.block.0.1.running_var" in message
    # An image size that does not fit the checkpoint shows up as a mis-shaped fc1.
    torch.save(torch_student.state_dict(), path)
    with pytest.raises(WeightsError, match="fc1.weight"):
        load_student_pth(path, Student(**TINY), image_size=128)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_importer(torch_student, tmp_path, suffix):
    """An ImageNet-style torchvision file (classifier included) fills a student's base_model."""
    path = torchvision_file(torch_student, tmp_path / f"efficientnet_b0{suffix}")
    imported = load_torchvision_efficientnet(path, "b0")
    x = jnp.asarray(nhwc(random_images().numpy()))
    expected = flax_variables(EfficientNet("b0"), torch_student.base_model, x, prefix="")
    assert jax.tree_util.tree_all(jax.tree.map(np.array_equal, imported, expected))
    student = jax.eval_shape(Student(**TINY).init, jax.random.PRNGKey(0), x)
    merged = with_base_model(student, imported)
    assert merged["params"]["base_model"] is imported["params"]
    assert merged["batch_stats"]["base_model"] is imported["batch_stats"]
    assert merged["params"]["fc1"] is student["params"]["fc1"]


def test_a_distillation_starts_from_the_imagenet_file_and_the_random_head(torch_student, tmp_path):
    """`student.imagenet`: the base_model is the file's (as the importer reads it alone), the other
    parts the random init's, value for value, though that init is compiled without the base's."""
    from dpiqa_jax.train.distill import init_student

    path = torchvision_file(torch_student, tmp_path / "efficientnet_b0.pth")
    student = Student(**TINY)
    variables = init_student(student, 64, seed=3, imagenet=str(path))
    expected = with_base_model(init_student(student, 64, seed=3), load_torchvision_efficientnet(path, "b0"))
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)


def torchvision_file(torch_student, path):
    """`path` (.pth or .safetensors): a torchvision EfficientNet-B0 state dict, classifier included,
    holding `torch_student`'s base weights."""
    base = torchvision.models.efficientnet_b0(weights=None)
    base.load_state_dict(torch_student.base_model.state_dict(), strict=False)  # all but the classifier
    if path.suffix == ".pth":
        torch.save(base.state_dict(), path)
    else:
        safetensors.numpy.save_file(state_numpy(base), str(path))
    return path


def test_parameter_count_at_the_authors_size():
    shapes = jax.eval_shape(Student().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(shapes["params"]))
    with torch.device("meta"):  # shapes only
        theirs = sum(p.numel() for p in TorchStudent().parameters())
    print(f"student parameters: ours {ours:,}, PyTorch {theirs:,}")
    assert ours == theirs
    assert abs(ours - 81.0e6) < 0.05e6
