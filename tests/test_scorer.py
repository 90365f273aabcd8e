"""The Scorer's batching around any model: streaming, padding, the key of each batch's draws and
unreadable files (the model here is a stand-in that reports what it was given)."""
import numpy as np
import pytest
from PIL import Image

from dpiqa_jax.data.images import ImageError, load_image
from dpiqa_jax.errors import UserError
from dpiqa_jax.scorer import Scorer

SIZE = 8


def recording_scorer(batch_size: int):
    """A Scorer whose 'score' is an image's mean level and whose map is 1000 x the batch's start."""
    calls = []

    def predict(images, start):
        assert images.shape == (batch_size, SIZE, SIZE, 3)  # always a whole (padded) batch
        calls.append(start)
        return images.mean(axis=(1, 2, 3)), np.full((batch_size, 1, 1, 8), 1000.0 * start)

    return Scorer(predict, SIZE, batch_size), calls


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20 + i, 30, 3), 30 * i, np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    return paths, str(tmp_path / "bad.png")


def test_batches_keep_input_order_leave_out_bad_files_and_key_batches_by_position(files):
    paths, bad = files
    scorer, calls = recording_scorer(batch_size=3)
    inputs = paths[:1] + [bad] + paths[1:]  # the bad file is the second input of the first batch
    errors = []
    batches = list(scorer.batches(inputs, on_error=lambda path, message: errors.append((path, message))))
    assert [b[0] for b in batches] == [[paths[0], paths[1]], paths[2:5], paths[5:]]
    assert errors == [(bad, errors[0][1])] and errors[0][1].startswith(f"{bad}: ")
    # Each batch is keyed by its first input's position among all inputs, bad ones included.
    assert calls == [0, 3, 6]
    assert [b[3][0, 0, 0, 0] for b in batches] == [0.0, 3000.0, 6000.0]
    expected = np.stack([load_image(p, SIZE) for p in paths])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), expected)
    np.testing.assert_allclose(np.concatenate([b[2] for b in batches]), expected.mean(axis=(1, 2, 3)),
                               rtol=1e-6)


def test_call_and_feature_maps_take_paths_and_arrays_alike(files):
    paths, _ = files
    scorer, _ = recording_scorer(batch_size=2)
    arrays = scorer.load(paths)
    np.testing.assert_array_equal(arrays, np.stack([load_image(p, SIZE) for p in paths]))
    np.testing.assert_array_equal(scorer(paths), scorer(list(arrays)))
    assert scorer.feature_maps(paths).shape == (len(paths), 1, 1, 8)


def test_unreadable_file_raises_without_on_error_and_no_input_is_an_error(files):
    paths, bad = files
    scorer, _ = recording_scorer(batch_size=2)
    with pytest.raises(ImageError, match=f"^{bad}: "):
        scorer(paths[:3] + [bad])
    with pytest.raises(UserError, match="no images given"):
        scorer([])
