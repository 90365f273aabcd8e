"""Untrusted checkpoints: a pickle that would run code is refused by every reader and runs nothing,
torch is new enough for weights_only to hold, and no code path can unpickle anything else."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import CLI, REPO, environment, run

from dpiqa_jax import scorer, teacher
from dpiqa_jax.data.splits import read_indices
from dpiqa_jax.errors import UserError
from dpiqa_jax.prompts import load_prompt_embeddings
from dpiqa_jax.student_io import load_student
from dpiqa_jax.weights import torch_files

SOURCES = [p for folder in ("dpiqa_jax", "scripts", "benchmarks", "configs")
           for p in sorted((REPO / folder).rglob("*.py"))]


class _RunsCode:
    """Unpickling this calls exec: what a booby-trapped checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def trap(tmp_path):
    """(a .pth that creates `marker` when unpickled, marker)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.pth"
    torch.save({"unet.conv_in.weight": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    return path, marker


def test_the_trap_does_run_code_when_unpickled_unsafely(trap):
    path, marker = trap
    torch.load(path, weights_only=False)  # what no reader of ours may do
    assert marker.exists()


READERS = {
    "teacher": lambda p: teacher.load_teacher(str(p), prompt_embeddings=str(p)),
    "student": lambda p: load_student(str(p)),
    "scorer": lambda p: scorer.load(p),
    "split indices": read_indices,
    "prompt embeddings": load_prompt_embeddings,
    "state dict": lambda p: torch_files.read_tensors(str(p)),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_the_trap_and_runs_nothing(trap, reader):
    path, marker = trap
    with pytest.raises(UserError, match=f"{path}: cannot be read as a weights-only PyTorch file"):
        READERS[reader](path)
    assert not marker.exists()


def test_predict_refuses_the_trap_in_one_line(trap, tmp_path):
    path, marker = trap
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # never reached
    result = run(CLI + ["predict", "--checkpoint", str(path), str(image)], environment(tmp_path), timeout=300)
    assert result.returncode != 0 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "weights-only" in lines[0], result.stderr


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npy"])
def test_truncated_files_are_one_error_naming_the_file(suffix, tmp_path):
    """A download cut short: every reader says which file and why, in one line."""
    path = tmp_path / f"cut{suffix}"
    weights = np.zeros((64, 32), np.float32)
    if suffix == ".pth":
        torch.save({"w": torch.from_numpy(weights)}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"w": weights}, str(path))
    else:
        np.save(path, weights)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    readers = [load_prompt_embeddings, read_indices]
    readers += [torch_files.read_tensors, scorer.load] if suffix != ".npy" else []
    for reader in readers:
        with pytest.raises(UserError) as error:
            reader(str(path))
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value), reader


def test_object_arrays_in_npy_files_are_refused(tmp_path):
    path = tmp_path / "prompts.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="prompts.npy"):
        load_prompt_embeddings(path)
    with pytest.raises(UserError, match="prompts.npy"):
        read_indices(path)


def test_torch_older_than_the_weights_only_fix_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.zeros(2)}, path)
    assert list(torch_files.read_tensors(str(path))) == ["w"]
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(UserError, match=r"torch 2\.5\.1\+cpu cannot load \.pth files safely"):
        torch_files.read_tensors(str(path))


PICKLERS = ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that could unpickle arbitrary objects: pickle-family loads, torch.load without a
    literal weights_only=True, and any allow_pickle=True."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"imports {n}" for n in names if n and n.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if _is_true(keywords.get("allow_pickle")):
            found.append(f"{name}(allow_pickle=True)")
        if name.endswith("torch.load") or name == "load" and "weights_only" in keywords:
            if not _is_true(keywords.get("weights_only")):
                found.append(f"{name} without weights_only=True")
    return found


def test_no_source_can_unpickle_arbitrary_objects():
    assert len(SOURCES) > 30
    problems = {str(p.relative_to(REPO)): bad for p in SOURCES
                if (bad := _unsafe_calls(ast.parse(p.read_text())))}
    assert problems == {}


def test_the_scan_finds_what_it_looks_for():
    bad = ast.parse("import pickle\nimport torch\nx = torch.load('f')\n"
                    "y = torch.load('f', weights_only=False)\nz = np.load('f', allow_pickle=True)\n")
    assert _unsafe_calls(bad) == ["imports pickle", "torch.load without weights_only=True",
                                  "torch.load without weights_only=True", "np.load(allow_pickle=True)"]
