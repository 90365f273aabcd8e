"""`dpiqa-jax predict` on a teacher .pth saved the authors' way (torch.save of the state dict)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracle import rel_err
from PIL import Image
from test_teacher import TINY, tiny_pair

from dpiqa_jax.data.images import load_image


def dpiqa_jax(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dpiqa_jax.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    ref, _, _ = tiny_pair(seed=3)
    torch.save(ref.state_dict(), tmp / "teacher.pth")
    prompts = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    torch.save(prompts, tmp / "quality_embeddings.pth")
    (tmp / "model.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(80, 70), (64, 64), (50, 90)]):
        path = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)
        paths.append(path)
    images = np.stack([load_image(str(p), 64) for p in paths])
    with torch.no_grad():
        expected = ref(torch.as_tensor(images).permute(0, 3, 1, 2), prompts)[0][:, 0].numpy()
    return tmp, paths, expected


def test_predict_authors_checkpoint_gives_oracle_scores(authors_files):
    tmp, paths, expected = authors_files
    out = tmp / "scores.json"
    # The prompt file is found beside the checkpoint; batch 2 leaves a padded last batch.
    result = dpiqa_jax("predict", "--checkpoint", tmp / "teacher.pth", "--model-config", tmp / "model.json",
                       "--batch-size", 2, "--output", out, *paths, cwd=tmp)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rel_err([r["score"] for r in rows], expected) < 1e-4


def test_predict_reports_a_bad_key_in_one_line(authors_files):
    tmp, paths, _ = authors_files
    state = torch.load(tmp / "teacher.pth", weights_only=True)
    del state["QFD.fc1.weight"]
    torch.save(state, tmp / "broken.pth")
    result = dpiqa_jax("predict", "--checkpoint", tmp / "broken.pth", "--model-config", tmp / "model.json",
                       "--prompt-embeddings", tmp / "quality_embeddings.pth", paths[0], cwd=tmp)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.pth" in lines[0] and "QFD.fc1.weight" in lines[0]


def test_embed_prompts_command_writes_the_prompt_matrix(tmp_path):
    from fixtures import write_tiny_clip_folder

    from dpiqa_jax.prompts import embed_prompts

    folder = write_tiny_clip_folder(tmp_path / "clip")
    result = dpiqa_jax("embed-prompts", "--clip", folder, "--output", tmp_path / "e.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = np.load(tmp_path / "e.npy")
    assert written.shape == (1485, 32)
    np.testing.assert_allclose(written, embed_prompts(folder), rtol=1e-5, atol=1e-6)
    missing = dpiqa_jax("embed-prompts", "--clip", tmp_path / "nowhere", "--output", tmp_path / "x.npy",
                        cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_orbax_teacher_checkpoint_round_trips_through_predict(authors_files, tmp_path):
    import jax

    from dpiqa_jax.teacher import load_teacher, restore_teacher, save_teacher

    tmp, paths, expected = authors_files
    cfg, params, embeddings = load_teacher(str(tmp / "teacher.pth"), model_config=str(tmp / "model.json"))
    save_teacher(str(tmp_path / "ours"), cfg, params, embeddings)
    cfg2, params2, embeddings2 = restore_teacher(str(tmp_path / "ours"))
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    np.testing.assert_array_equal(embeddings2, embeddings)
    out = tmp_path / "scores.csv"
    result = dpiqa_jax("predict", "--checkpoint", tmp_path / "ours", "--output", out, *paths, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scores = [float(line.split(",")[-1]) for line in out.read_text().splitlines()[1:]]
    assert rel_err(scores, expected) < 1e-4
