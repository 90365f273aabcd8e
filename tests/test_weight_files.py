"""Reading state-dict files (`torch_files.read_tensors`): safetensors files and zip-format torch
pickles are memory-mapped rather than copied, legacy pickles read whole, with the values torch and
safetensors themselves read; `load_state_dict` copies out of the map."""
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpiqa_jax.errors import UserError
from dpiqa_jax.weights import torch_files
from dpiqa_jax.weights.torch_names import load_state_dict


def tensors() -> dict:
    """One tensor of every dtype the reader maps, odd shapes, a scalar and an empty one."""
    g = torch.Generator().manual_seed(0)
    floats = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    out = {name: torch.randn(3, 5, 7, generator=g).to(dtype) for dtype, name in floats.items()}
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        out[str(dtype).split(".")[1]] = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (4, 9),
                                                      generator=g, dtype=dtype)
    out |= {"bool": torch.rand(6, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    return out


def mapped(path) -> bool:
    """Whether this process maps the file (Linux)."""
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: compare its bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def test_safetensors_files_are_mapped_with_their_values_and_dtypes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    got, expected = torch_files.read_tensors(str(path)), load_file(str(path))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        want = as_numpy(tensor)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].tobytes() == want.tobytes(), name
        assert not got[name].flags.writeable, name
    assert mapped(path)


def test_an_unknown_safetensors_dtype_is_one_line_naming_it(tmp_path):
    path = tmp_path / "f8.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(path))
    with pytest.raises(UserError, match=f"{path}: w is F8_E4M3, which dpiqa_jax does not read"):
        torch_files.read_tensors(str(path))


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_pickles_are_mapped_when_zip_format_and_read_whole_otherwise(tmp_path, zipped):
    path = tmp_path / "w.pth"
    state = {k: v for k, v in tensors().items() if k != "bf16"}
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    got = torch_files.read_tensors(str(path))
    for name, tensor in state.items():
        np.testing.assert_array_equal(got[name], tensor.numpy(), err_msg=name)
    assert mapped(path) == zipped


def test_load_state_dict_copies_out_of_the_map(tmp_path):
    """New C-ordered, writable arrays in the model's layout: nothing of the file stays mapped."""
    path = tmp_path / "w.safetensors"
    kernel = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(7, 5, 3, 2)  # torch's OIHW
    save_file({"conv.weight": torch.from_numpy(kernel), "conv.bias": torch.ones(7)}, str(path))
    shapes = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 2, 5, 7), np.float32),
                       "bias": jax.ShapeDtypeStruct((7,), np.float32)}}
    params = load_state_dict(shapes, torch_files.read_tensors(str(path)))
    for value in jax.tree.leaves(params):
        assert value.flags.c_contiguous and value.flags.writeable and value.flags.owndata
    np.testing.assert_array_equal(params["conv"]["kernel"], kernel.transpose(2, 3, 1, 0))
