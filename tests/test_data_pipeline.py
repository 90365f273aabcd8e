"""The input pipeline on a fake KonIQ-10k: exact images, epochs, resuming, processes and devices."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import encode, make_fake, photo, prepare_fake

from dpiqa_jax.data import DatasetError, ImageError, load_image
from dpiqa_jax.data.pipeline import eval_batches, to_global, train_batches
from dpiqa_jax.data.source import prepare
from dpiqa_jax.data.splits import resolve

SIZE = 16


@pytest.fixture(scope="module")
def koniq(tmp_path_factory):
    """A fake KonIQ-10k of 24 images (official split 12 / 6 / 6), prepared; its TFDS folder."""
    root = tmp_path_factory.mktemp("koniq")
    prepare_fake("koniq10k", root, n=24)
    return str(root / "tfds")


def _train(data_dir, split="random", n=None, **kwargs):
    kwargs = {"batch_size": 4, "image_size": SIZE, "seed": 1, "data_dir": data_dir, "process_index": 0,
              "process_count": 1, **kwargs}
    stream = train_batches("koniq10k", split, **kwargs)
    return stream if n is None else [next(stream) for _ in range(n)]


def _eval(data_dir, split="official", **kwargs):
    kwargs = {"batch_size": 4, "image_size": SIZE, "data_dir": data_dir, "process_index": 0,
              "process_count": 1, **kwargs}
    return list(eval_batches("koniq10k", split, **kwargs))


def test_batches_are_load_image_of_the_files(koniq):
    images = Path(koniq).parent / "manual" / "1024x768"
    batches = _eval(koniq)
    assert [b["image"].shape for b in batches] == [(4, SIZE, SIZE, 3)] * 2
    for batch in batches:
        for image, index, mask in zip(batch["image"], batch["index"], batch["mask"], strict=True):
            if mask:
                np.testing.assert_array_equal(image, load_image(str(images / f"{1000 + index}.jpg"), SIZE))
    train = _train(koniq, n=1)[0]
    assert set(train) == {"image", "target", "index"}
    assert train["image"].dtype == np.float32 and train["target"].dtype == np.float32
    assert train["index"].dtype == np.int32


def test_uint8_batches_become_the_float_batches_on_the_devices(koniq):
    """The run's batches travel as uint8 and are scaled on the devices: the float32 batches to one
    float32 step (every level 0-255 checked), with the batch sharding."""
    import jax

    from dpiqa_jax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(1)
    levels = {"image": np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)}
    expected = levels["image"].astype(np.float32) / np.float32(255)
    np.testing.assert_array_max_ulp(to_global(levels, mesh, mesh_lib.BATCH_AXES)["image"], expected, maxulp=1)
    for uint8, floats in ((_eval(koniq, image_dtype="uint8"), _eval(koniq)),
                          (_train(koniq, n=2, image_dtype="uint8"), _train(koniq, n=2))):
        for raw, batch in zip(uint8, floats, strict=True):
            assert raw["image"].dtype == np.uint8 and raw["image"].nbytes * 4 == batch["image"].nbytes
            on_devices = to_global(raw, mesh, mesh_lib.BATCH_AXES)
            assert on_devices["image"].sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 4)
            got = jax.device_get(on_devices)
            np.testing.assert_array_max_ulp(got.pop("image"), batch.pop("image"), maxulp=1)
            jax.tree.map(np.testing.assert_array_equal, got, batch)


def test_epochs_reshuffled_remainder_dropped(koniq):
    parts = resolve("random", {"all": np.arange(24)}, "koniq10k")
    batches = _train(koniq, n=8)  # 19 train images: 4 batches of 4 per epoch, 3 dropped each epoch
    epochs = [np.concatenate([b["index"] for b in batches[e * 4:(e + 1) * 4]]) for e in range(2)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 16 and set(epoch.tolist()) <= set(parts["train"].tolist())
    assert epochs[0].tolist() != epochs[1].tolist()
    other_seed = _train(koniq, n=1, seed=2)[0]
    assert other_seed["index"].tolist() != batches[0]["index"].tolist()


def test_resume_sees_the_same_batches(koniq):
    straight = _train(koniq, n=7)
    interrupted = _train(koniq)
    for _ in range(3):
        next(interrupted)
    state = interrupted.state()
    assert state == {"step": 3}
    resumed = [_train(koniq, start_step=state["step"]), interrupted]
    interrupted.restore(state)
    for stream in resumed:
        for expected in straight[3:]:
            batch = next(stream)
            np.testing.assert_array_equal(batch["index"], expected["index"])
            np.testing.assert_array_equal(batch["image"], expected["image"])


def test_processes_split_each_global_batch(koniq):
    whole = _train(koniq, n=5, batch_size=6)
    shares = [_train(koniq, n=5, batch_size=6, process_index=p, process_count=2) for p in range(2)]
    for t in range(5):
        assert [b["index"].shape for b in (shares[0][t], shares[1][t])] == [(3,), (3,)]
        np.testing.assert_array_equal(np.concatenate([shares[0][t]["index"], shares[1][t]["index"]]),
                                      whole[t]["index"])


def _scored(batches) -> list:
    return [int(i) for b in batches for i, m in zip(b["index"], b["mask"], strict=True) if m]


@pytest.mark.parametrize("split,part", [("official", "test"), ("official", "validation"), ("random", "test")])
def test_eval_two_processes_score_every_image_once(koniq, split, part):
    shares = [_eval(koniq, split, part=part, process_index=p, process_count=2) for p in range(2)]
    assert len(shares[0]) == len(shares[1])
    seen = Counter(_scored(shares[0]) + _scored(shares[1]))
    assert sorted(seen) == sorted(_scored(_eval(koniq, split, part=part))) and set(seen.values()) == {1}


_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
from dpiqa_jax.data.pipeline import eval_batches, to_global
MESHES = [((1,), ("data",)), ((3,), ("data",)), ((8,), ("data",)), ((4, 2), ("data", "fsdp"))]
result = {}
for split, (shape, axes) in [(split, mesh) for split in sys.argv[2:] for mesh in MESHES]:
    count = int(np.prod(shape))
    mesh = jax.make_mesh(shape, axes, devices=jax.devices()[:count])
    score = jax.jit(lambda image, mask: image.mean(axis=(1, 2, 3)) * mask)
    seen = []
    batches = eval_batches("koniq10k", split, batch_size=2 * count, image_size=8, data_dir=sys.argv[1],
                           process_index=0, process_count=1)
    for batch in batches:
        batch = to_global(batch, mesh, axes)
        assert len(batch["image"].sharding.device_set) == count
        scores = np.asarray(score(batch["image"], batch["mask"]))
        keep = np.asarray(batch["mask"]) > 0
        assert np.all(scores[~keep] == 0)
        seen += np.asarray(batch["index"])[keep].tolist()
    result.setdefault(split, []).append(seen)
print(json.dumps(result))
"""


def test_eval_scores_every_image_once_on_1_3_8_devices(koniq):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, koniq, "official", "random"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for split, size in (("official", 6), ("random", 5)):
        assert len(seen[split]) == 4  # meshes of 1, 3, 8 and 4x2 devices
        for indices in seen[split]:
            assert len(indices) == size and len(set(indices)) == size
        assert len({tuple(sorted(v)) for v in seen[split]}) == 1


def test_indices_split_from_authors_file(koniq, tmp_path):
    import torch

    torch.save([3, 17, 5, 22, 9, 0, 11, 14], tmp_path / "koniq_train_indices.pth")
    split = f"indices:{tmp_path / 'koniq_train_indices.pth'}"
    seen = {int(i) for b in _train(koniq, split, n=4) for i in b["index"]}
    assert seen == {0, 3, 5, 9, 11, 14, 17, 22}
    assert set(_scored(_eval(koniq, split))) == set(range(24)) - seen


def test_pipeline_errors(koniq, tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="batch size 5 must be a positive multiple of the 2 processes"):
        _train(koniq, batch_size=5, process_count=2)
    with pytest.raises(DatasetError, match="fewer than one batch of 32"):
        _train(koniq, batch_size=32)
    with pytest.raises(DatasetError, match="no part 'extra'"):
        _eval(koniq, part="extra")
    manual = make_fake("koniq10k", tmp_path / "manual", n=8)
    (manual / "1024x768" / "1001.jpg").write_bytes(encode(photo(), "JPEG")[:200])
    with pytest.raises(DatasetError, match=r"1 of the 8 images cannot be read.*1001.jpg: truncated file"):
        prepare("koniq10k", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    # Records written without that check (an older build) still fail by name when read.
    monkeypatch.setattr("dpiqa_jax.data.base.unreadable", lambda paths: {})
    prepare("koniq10k", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(ImageError, match=r"koniq10k/1.0.0 1001.jpg: truncated file"):
        _eval(str(tmp_path / "tfds"), "official", part="train")
