"""The per-example cache (teacher maps, VAE posteriors): built once, reused only when the same
model and examples made it, never used half-written, safe to build from several runs at once, and
joined to batches by example index."""
import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import REPO, free_port

from dpiqa_jax.data.pipeline import PAD
from dpiqa_jax.train import example_cache

INDICES = np.array([7, 3, 11, 5])  # a split's train indices, in no particular order
SHAPE = (2, 2, 1)
SHAPES = {"map": SHAPE, "std": (3,)}  # two arrays, as the VAE posterior's mean and std


def fake_map(index, shape=SHAPE):
    return np.full(shape, index, np.float32)


def build(tmp_path, identity, compute, indices=INDICES, shapes=SHAPES):
    return example_cache.load_or_build(str(tmp_path), "maps", identity, indices, shapes, compute)


def passes(calls):
    """A compute() that yields two padded batches covering INDICES, counting its calls."""
    def compute():
        calls.append(1)
        for keys in ([7, 3, 11], [5, PAD, PAD]):
            keys = np.array(keys)
            yield {"map": np.stack([fake_map(k) for k in keys]),
                   "std": np.stack([fake_map(-k, (3,)) for k in keys]),
                   "index": keys, "mask": (keys != PAD).astype(np.float32)}
    return compute


def test_built_once_then_reused_and_joined_by_index(tmp_path, capfd):
    calls = []
    maps = build(tmp_path, {"teacher": "a"}, passes(calls))
    assert "maps: 100%|██████████| 4/4 " in capfd.readouterr().err  # the pass's bar, padding not counted
    again = build(tmp_path, {"teacher": "a"}, passes(calls))
    assert len(calls) == 1 and "maps:" not in capfd.readouterr().err
    batch = {"index": np.array([11, 5, 11]), "image": np.zeros(3)}
    for cache in (maps, again):
        joined = cache.join(batch)
        np.testing.assert_array_equal(joined["map"], np.stack([fake_map(k) for k in (11, 5, 11)]))
        np.testing.assert_array_equal(joined["std"], np.stack([fake_map(-k, (3,)) for k in (11, 5, 11)]))
        assert joined["image"] is batch["image"]
    with pytest.raises(RuntimeError, match="lacks"):
        maps.join({"index": np.array([3, 4])})
    with pytest.raises(RuntimeError, match="lacks"):
        maps.join({"index": np.array([12])})


@pytest.mark.parametrize("change", ["teacher", "examples", "shape"])
def test_rebuilt_for_another_teacher_split_or_shape(tmp_path, change):
    calls = []
    build(tmp_path, {"teacher": "a"}, passes(calls))
    identity, indices, shape = {"teacher": "a"}, INDICES, SHAPE
    if change == "teacher":
        identity = {"teacher": "b"}
    elif change == "examples":
        indices = INDICES[:3]
    else:
        shape = (1, 4, 1)

    def compute():
        for batch in passes(calls)():
            yield {**batch, "map": batch["map"].reshape(-1, *shape)}

    maps = build(tmp_path, identity, compute, indices, {**SHAPES, "map": shape})
    assert len(calls) == 2 and maps.arrays["map"].shape == (len(indices), *shape)


def test_a_build_that_did_not_finish_is_never_used(tmp_path):
    def killed():
        yield from passes([])()
        raise KeyboardInterrupt  # stands in for a kill during the pass

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, {"teacher": "a"}, killed)
    (unfinished,) = (tmp_path / "maps").iterdir()  # this process's build folder, never a cache's name
    assert ".tmp-" in unfinished.name and (unfinished / "map.npy").exists()
    calls = []
    maps = build(tmp_path, {"teacher": "a"}, passes(calls))
    assert len(calls) == 1 and maps.join({"index": np.array([3])})["map"][0, 0, 0, 0] == 3
    (folder,) = (tmp_path / "maps").iterdir()  # the unfinished build is gone
    assert json.loads((folder / "identity.json").read_text())["teacher"] == "a"


def test_a_damaged_cache_is_rebuilt_and_abandoned_builds_of_this_host_go(tmp_path):
    """Build folders of processes that no longer exist go (a killed run's); those of live processes
    (another run building now) and of other hosts (a shared file system) stay."""
    build(tmp_path, {"teacher": "a"}, passes([]))
    (folder,) = (tmp_path / "maps").iterdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    stay = [f"{socket.gethostname()}-{os.getppid()}", f"another-host-{ended.pid}"]
    for suffix in stay + [f"{socket.gethostname()}-{ended.pid}"]:
        (tmp_path / "maps" / f"{folder.name}.tmp-{suffix}").mkdir()
    (folder / "identity.json").unlink()  # damaged by hand
    calls = []
    maps = build(tmp_path, {"teacher": "a"}, passes(calls))
    assert len(calls) == 1 and maps.join({"index": np.array([11])})["map"][0, 0, 0, 0] == 11
    names = sorted(path.name for path in (tmp_path / "maps").iterdir())
    assert names == sorted([folder.name] + [f"{folder.name}.tmp-{suffix}" for suffix in stay])


def test_a_run_that_completes_the_same_cache_second_keeps_the_first(tmp_path):
    """Two runs that build one cache at once (a sweep sharing a cache_dir): the second to finish
    drops its copy and the first's files stay in place (their readers have them mapped)."""
    build(tmp_path, {"teacher": "a"}, passes([]))
    (folder,) = (tmp_path / "maps").iterdir()
    first = (folder / "map.npy").stat().st_ino
    identity = json.loads((folder / "identity.json").read_text())
    late_run = passes([])
    example_cache._build(str(folder), identity, np.sort(INDICES), SHAPES, late_run, write=True)
    assert [path.name for path in (tmp_path / "maps").iterdir()] == [folder.name]
    assert (folder / "map.npy").stat().st_ino == first


def test_a_pass_that_misses_an_example_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="missed 1 examples"):
        build(tmp_path, {"teacher": "a"}, passes([]), np.append(INDICES, 40))


def test_processes_that_lack_the_cache_all_take_part_in_its_pass_and_each_copy_is_written_once(tmp_path):
    """Two jax.distributed processes whose pass is a collective: on a root they share, process 0
    alone writes; on roots of their own, each writes its copy; when only process 1 lacks its copy
    (a replaced host with a local cache_dir), both run the pass (before: process 1 waited alone in
    the collective) and only process 1 writes; with every copy there, no pass."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONPATH=str(REPO / "tests"))
    script = str(REPO / "tests" / "example_cache_script.py")
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i), str(tmp_path)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    wrote = {case: [r[case]["wrote"] for r in reports] for case in reports[0]}
    assert wrote == {"shared": [True, False], "own": [True, True], "one_lacks": [False, True],
                     "all_have": [False, False]}
    assert [[r[case]["pass"] for case in r] for r in reports] == [[True, True, True, False]] * 2
    assert all(r[case]["rows"] == [0, 2, 4, 6, 8, 10] for r in reports for case in r)
    assert len(list((tmp_path / "shared" / "values").iterdir())) == 1  # the cache alone: no probe, no copy


def test_the_disk_space_of_a_cache_is_reserved_before_its_pass(tmp_path):
    """A disk that fills up while mapped pages are written kills the process (SIGBUS): the build
    takes its space when it starts, so that a full disk is an error then."""
    shape = (64, 64, 8)  # a teacher map: 128 KiB per example, which a sparse file would not hold yet

    def compute():
        for path in (tmp_path / "maps").glob("*.tmp-*/map.npy"):
            reserved.append(path.stat().st_blocks * 512 >= path.stat().st_size)
        yield {"map": np.ones((len(INDICES), *shape), np.float32), "index": INDICES,
               "mask": np.ones(len(INDICES), np.float32)}

    reserved = []
    build(tmp_path, {"teacher": "a"}, compute, shapes={"map": shape})
    assert reserved == [True]


def test_a_cache_with_no_room_on_its_disk_is_a_one_line_error(tmp_path):
    """The file system refuses the space (here a file-size limit, as a full disk or a quota would):
    one line naming the folder, the size and the reason, before the pass; nothing left behind."""
    script = f"""
import resource, numpy as np
from dpiqa_jax.errors import UserError
from dpiqa_jax.train import example_cache
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    example_cache.load_or_build({str(tmp_path)!r}, "maps", {{}}, np.arange(4), {{"map": (256, 512)}}, None)
except UserError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (folder,) = [line for line in result.stdout.splitlines() if not line.startswith("dpiqa-jax:")]
    assert folder.startswith(str(tmp_path / "maps")), folder
    assert folder.endswith(": no room for this cache (2.0 MiB): File too large; free space there (`dpiqa-jax "
                           "caches FOLDER --unused-for DAYS` removes old caches) or set cache_dir to another "
                           "folder"), folder
    assert list((tmp_path / "maps").iterdir()) == []


def test_params_digest_tells_teachers_apart():
    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
    same = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4)}}
    other = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4).at[2].set(1.001)}}
    assert example_cache.params_digest(params) == example_cache.params_digest(same)
    assert example_cache.params_digest(params) != example_cache.params_digest(other)


def test_params_digest_is_the_same_however_the_params_are_sharded(tmp_path):
    """The same weights on 1 device, replicated on 4, and sharded over 4 along either axis (as FSDP
    cuts them): one digest, so that runs on any mesh find the caches of the others. Float sums on
    the devices gave the 4-way shardings other digests (summed in another order)."""
    script = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dpiqa_jax.train import example_cache, mesh as mesh_lib
rng = np.random.default_rng(0)
scale = 10.0 ** rng.integers(-3, 4, (64, 256))  # magnitudes far apart: float sums depend on the order
params = {"kernel": (rng.standard_normal((64, 256)) * scale).astype(np.float32),
          "bias": rng.standard_normal(256).astype(np.float32)}
mesh = mesh_lib.make_mesh(4)  # data 1 x fsdp 4, as the trainer makes it
specs = [{"kernel": P(), "bias": P()}, {"kernel": P("fsdp"), "bias": P("fsdp")},
         {"kernel": P(None, "fsdp"), "bias": P()}]
placed = [jax.device_put(params, jax.devices()[0])] + [
    jax.device_put(params, {k: NamedSharding(mesh, v) for k, v in spec.items()}) for spec in specs]
print(*(example_cache.params_digest(p) for p in placed))
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    digests = result.stdout.split()
    assert len(digests) == 4 and len(set(digests)) == 1, digests


def test_the_cache_with_drawn_latents_is_a_config_error():
    from dpiqa_jax.errors import UserError
    from dpiqa_jax.train.config_util import load_config
    from dpiqa_jax.train.distill import student_task

    config = load_config(str(REPO / "configs" / "student_demo.py"))
    config.model.latents = "sample"
    with pytest.raises(UserError, match="'student.cache_teacher' needs .* set 'model.latents' to 'mean'"):
        student_task(config, "no/teacher/needed/to/see/this")
