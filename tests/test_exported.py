"""The stored train step (`exported`): the jitted step's own results from a cold and a warm start,
one program per key, a damaged file made again, the plain step where export is refused, the run
going on where the program cannot be written, and the processes of a multi-host run agreeing."""
import errno
import json
import os
import sys
import time

import jax
import numpy as np
import pytest
from jax import export
from test_train_step import copy, make
from train_fakes import fake_batch

from dpiqa_jax.train import exported
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train.checkpoint import atomic_write

IDENTITY = {"config": "demo", "schedule": [3, 9]}


def setup(batch_size=16):
    """(plain jitted step, its arguments on the mesh, the mesh)."""
    mesh = mesh_lib.make_mesh(1)
    state, step, embeddings = make(mesh=mesh)
    batch = jax.device_put(fake_batch(batch_size), mesh_lib.batch_sharding(mesh))
    return step, (state, batch, jax.device_put(embeddings, mesh_lib.replicated(mesh))), mesh


def two_steps(step, args):
    state, batch, embeddings = args
    state, first = step(copy(state), batch, embeddings)
    state, second = step(state, batch, embeddings)
    return state, first, second


def refuse(*_args, **_kwargs):
    raise ValueError("refused\nsecond line")


def test_the_stored_step_is_the_jitted_step_from_a_cold_and_a_warm_start(tmp_path, monkeypatch):
    step, args, mesh = setup()
    cold = exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    (stored,) = tmp_path.glob("*.bin")
    assert isinstance(cold, exported.FlatStep)
    os.utime(stored, (0, 0))
    monkeypatch.setattr(exported.export, "export", refuse)  # a warm start reads, never exports
    warm = exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    assert isinstance(warm, exported.FlatStep)
    assert not exported.read_back(cold) and exported.read_back(warm) and not exported.read_back(step)
    assert stored.stat().st_mtime > time.time() - 60  # marked used, for `dpiqa-jax caches`
    want = two_steps(step, args)
    for got in (two_steps(cold, args), two_steps(warm, args)):
        jax.tree.map(np.testing.assert_array_equal, got, want)
    state = copy(args[0])
    warm(state, *args[1:])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # the state is donated


def test_each_key_has_its_own_program(tmp_path, monkeypatch):
    step, args, mesh = setup()
    exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    exported.train_step(step, args, IDENTITY | {"schedule": [3, 10]}, mesh, str(tmp_path))
    exported.train_step(step, setup(batch_size=8)[1], IDENTITY, mesh, str(tmp_path))
    monkeypatch.setattr(exported, "source_digest", lambda: "edited")
    exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    assert len(list(tmp_path.glob("*.bin"))) == 4


def test_a_damaged_program_is_made_again(tmp_path):
    step, args, mesh = setup()
    exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    (stored,) = tmp_path.glob("*.bin")
    size = stored.stat().st_size
    stored.write_bytes(b"not a program")
    again = exported.train_step(step, args, IDENTITY, mesh, str(tmp_path))
    assert stored.stat().st_size == size
    jax.tree.map(np.testing.assert_array_equal, two_steps(again, args), two_steps(step, args))


def test_a_refused_export_leaves_the_plain_step_and_is_remembered(tmp_path, monkeypatch, capsys):
    step, args, mesh = setup()
    monkeypatch.setattr(exported.export, "export", refuse)
    assert exported.train_step(step, args, IDENTITY, mesh, str(tmp_path)) is step
    (why,) = tmp_path.glob("*.refused")
    assert why.read_text() == "ValueError: refused\nsecond line\n"
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(exported.export, "export", lambda *a, **k: pytest.fail("export tried again"))
    os.utime(why, (0, 0))
    assert exported.train_step(step, args, IDENTITY, mesh, str(tmp_path)) is step
    assert why.stat().st_mtime > time.time() - 60  # marked used


def test_a_program_that_cannot_be_stored_still_runs_and_says_why(tmp_path, capsys):
    """Storing the program is a cache: where it cannot be written (here a file stands where its folder
    should be; a full disk likewise) the run goes on with it, and one line says why."""
    step, args, mesh = setup()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    ready = exported.train_step(step, args, IDENTITY, mesh, str(blocked))
    err = capsys.readouterr().err
    assert err.startswith("dpiqa-jax: cannot keep the train step's program for the next start: [Errno 17]")
    assert err.count("\n") == 1 and blocked.read_text() == "a file, not a folder"
    jax.tree.map(np.testing.assert_array_equal, two_steps(ready, args), two_steps(step, args))


def test_a_write_that_fails_leaves_neither_a_partial_file_nor_its_temporary(tmp_path):
    """`atomic_write` (the stored programs, the caches' identity files, the workdir's model files)."""
    def full_disk(f):
        f.write(b"the first part")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "kept").write_bytes(b"before")
    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(tmp_path / "kept"), full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and (tmp_path / "kept").read_bytes() == b"before"


@pytest.mark.parametrize("config_file, changes, same", [
    ("demo.py", {"dataset.split": "random", "dataset.data_dir": "/d", "eval.every": "7",
                 "eval.latents": "sample", "checkpoint.every": "9", "log_every": "1", "seed": "3",
                 "cache_dir": "/c"}, True),
    ("demo.py", {"model.sd_dir": "/s", "model.embeddings": "/e.npy", "model.init_from": "/w"}, True),
    ("demo.py", {"optim.lr": "0.5"}, False),
    ("demo.py", {"model.dtype": "bfloat16"}, False),
    ("demo.py", {"model.latents": "mean"}, False),
    ("demo.py", {"loss.rank_weight": "1.0"}, False),
    ("student_demo.py", {"dataset.split": "random", "eval.every": "7", "seed": "3"}, True),
    ("student_demo.py", {"student.imagenet": "/b0.pth"}, True),
    ("student_demo.py", {"loss.map_weight": "0.5"}, False),
    ("student_demo.py", {"student.variant": "b1"}, False),
])
def test_the_stored_program_follows_what_the_train_step_is_built_from(config_file, changes, same):
    """Runs that differ only in what the step is given (split, paths, weight files, evaluation,
    checkpoints, logging, seed) share a program; a change to what builds it (optimiser, model, loss)
    never does: the model's architecture is in the task's description, which this test holds fixed."""
    from types import SimpleNamespace

    from train_helpers import REPO

    from dpiqa_jax.train.config_util import apply_overrides, load_config
    from dpiqa_jax.train.loop import step_identity

    task = SimpleNamespace(model_dict={"latent_size": 8}, closes_over={"teacher": {"latent_size": 8}})
    configs = [load_config(str(REPO / "configs" / config_file)) for _ in range(2)]
    apply_overrides(configs[1], list(changes.items()))
    base, changed = (step_identity(config, task, 3, 9) for config in configs)
    assert (base == changed) is same


def test_the_processes_of_a_multi_host_run_take_the_stored_program_all_or_none(tmp_path):
    """Two jax.distributed processes, a mesh across both, each with a folder of its own: a cold start
    (both export) and a warm one (both read) run the stored program, with the plain step's results;
    where one process has a refusal and the other the program, both run the plain step."""
    from train_helpers import environment, finish, start_processes

    script = [sys.executable, "tests/exported_script.py", str(tmp_path)]
    for out, _ in finish(start_processes(script, environment(tmp_path)), timeout=300):
        assert json.loads(out.splitlines()[-1]) == [True, True, False], out


def test_a_step_with_custom_calls_that_export_makes_no_promise_for_is_stored(tmp_path):
    """Such as cuDNN's attention on a GPU, under whatever names a JAX version gives them; here a
    custom call of a made-up name (stored, never run), which export refuses by default."""
    spec = jax.ShapeDtypeStruct((4,), np.float32)
    kernel = jax.ffi.ffi_call("dpiqa_made_up_kernel", spec)
    step = jax.jit(lambda state, x: ({"w": kernel(state["w"] + x)}, {"loss": x.sum()}), donate_argnums=(0,))
    mesh = mesh_lib.make_mesh(1)
    put = lambda a: jax.device_put(a, mesh_lib.replicated(mesh))
    args = ({"w": put(np.zeros(4, np.float32))}, put(np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="dpiqa_made_up_kernel"):
        export.export(step)(*args)
    assert isinstance(exported.train_step(step, args, IDENTITY, mesh, str(tmp_path)), exported.FlatStep)
    assert [p.suffix for p in tmp_path.iterdir()] == [".bin"]


def test_without_a_directory_the_step_is_the_plain_one():
    step, args, mesh = setup()
    assert exported.train_step(step, args, IDENTITY, mesh, None) is step


def test_the_source_digest_follows_the_package_python_files(tmp_path, monkeypatch):
    import shutil

    import dpiqa_jax

    copy_root = tmp_path / "dpiqa_jax"
    shutil.copytree(os.path.dirname(dpiqa_jax.__file__), copy_root)
    monkeypatch.setattr(dpiqa_jax, "__file__", str(copy_root / "__init__.py"))
    digest = exported.source_digest.__wrapped__  # uncached
    before = digest()
    (copy_root / "notes.txt").write_text("not code")
    assert digest() == before
    step_file = copy_root / "train" / "step.py"
    step_file.write_text(step_file.read_text() + "# edited\n")
    assert digest() != before
