"""The prompt list, its CLIP embedding matrix and the files that hold it."""
import numpy as np
import pytest
import torch
from fixtures import clip_text_features, tiny_clip_model, write_tiny_clip_folder
from oracle import rel_err
from safetensors.numpy import save_file
from transformers import CLIPTokenizer

from dpiqa_jax.errors import UserError
from dpiqa_jax.prompts import embed_prompts, load_prompt_embeddings, prompt_texts, save_prompt_embeddings


def test_prompt_order_and_count():
    texts = prompt_texts()
    assert len(texts) == len(set(texts)) == 5 * 9 * 33 == 1485
    expected = {
        0: ("animal", "jpeg2000 compression", "bad"),
        32: ("animal", "other realistic", "bad"),
        33: ("cityscape", "jpeg2000 compression", "bad"),
        297: ("animal", "jpeg2000 compression", "poor"),
        1484: ("others", "other realistic", "perfect"),
    }
    for i, (scene, distortion, quality) in expected.items():
        assert texts[i] == f"a photo of a {scene} with {distortion} artifacts, which is of {quality} quality"


def test_embed_prompts_matches_transformers(tmp_path):
    folder = write_tiny_clip_folder(tmp_path / "clip")
    actual = embed_prompts(folder, batch_size=500)  # 1485 = 2 x 500 + 485: the last batch is padded
    tokens = CLIPTokenizer.from_pretrained(str(folder))(prompt_texts(), padding="max_length", truncation=True,
                                                        max_length=77, return_tensors="np")
    expected = clip_text_features(tiny_clip_model(), tokens["input_ids"], tokens["attention_mask"])
    assert actual.shape == (1485, 32) and actual.dtype == np.float32
    assert rel_err(actual, expected) < 1e-4


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".pth"])
def test_prompt_embeddings_round_trip(tmp_path, suffix):
    matrix = np.random.default_rng(0).standard_normal((1485, 16)).astype(np.float32)
    path = tmp_path / f"quality_embeddings{suffix}"
    if suffix == ".npy":
        save_prompt_embeddings(matrix, path)
    elif suffix == ".safetensors":
        save_file({"embeddings": matrix}, str(path))
    else:
        torch.save(torch.from_numpy(matrix), path)  # as the authors ship quality_embeddings.pth
    np.testing.assert_array_equal(load_prompt_embeddings(path), matrix)


def test_prompt_embedding_file_errors(tmp_path):
    torch.save(torch.zeros(5), tmp_path / "flat.pth")
    with pytest.raises(UserError, match="2-D"):
        load_prompt_embeddings(tmp_path / "flat.pth")
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, tmp_path / "two.pth")
    with pytest.raises(UserError, match="single tensor"):
        load_prompt_embeddings(tmp_path / "two.pth")
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(UserError, match="junk.npy"):
        load_prompt_embeddings(tmp_path / "junk.npy")
    with pytest.raises(UserError, match="format"):
        load_prompt_embeddings(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        load_prompt_embeddings(tmp_path / "missing.npy")
    with pytest.raises(UserError, match=".npy"):
        save_prompt_embeddings(np.zeros((2, 2)), tmp_path / "e.pth")
