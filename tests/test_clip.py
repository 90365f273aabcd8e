"""The CLIP text tower against transformers' CLIPModel.get_text_features, and its folder loader."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import (
    TINY_CLIP_TEXT,
    clip_text_features,
    tiny_clip_model,
    write_tiny_clip_folder,
    write_tiny_clip_tokenizer,
)
from oracle import flax_params, rel_err

from dpiqa_jax.models.clip_text import (
    LEGACY_EOS_ID,
    VIT_L14,
    CLIPTextConfig,
    CLIPTextWithProjection,
    eos_positions,
)
from dpiqa_jax.weights.clip import load_clip_folder
from dpiqa_jax.weights.torch_names import WeightsError, to_state_dict

TOL = 1e-4
TEXTS = ["a photo of a night with lens artifacts, which is of good quality", "a dog", "x"]


def _tokens(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path)))
    tokens = tokenizer(TEXTS, padding=True, return_tensors="np")
    return tokens["input_ids"], tokens["attention_mask"]


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu"}])
def test_text_features_match_transformers(tmp_path, overrides):
    ids, mask = _tokens(tmp_path)
    assert (mask == 0).any()  # padded inputs
    text_config = {**TINY_CLIP_TEXT, **overrides}
    ref = tiny_clip_model(text_config)
    ours = CLIPTextWithProjection(CLIPTextConfig.from_transformers(ref.config.to_dict()))
    params = flax_params(ours, ref, jnp.asarray(ids))
    actual = jax.jit(ours.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert actual.shape == (len(TEXTS), TINY_CLIP_TEXT["projection_dim"])
    assert rel_err(actual, clip_text_features(ref, ids, mask)) < TOL


@pytest.mark.parametrize("eos_token_id,expected", [(300, [2, 1]), (LEGACY_EOS_ID, [4, 2])])
def test_pooled_token_is_chosen_as_transformers_does(eos_token_id, expected):
    # Token 300 plays EOS; 513 is the largest id, which legacy configs take for EOS.
    ids = np.array([[512, 40, 300, 41, 513, 300], [512, 300, 513, 513, 513, 513]], np.int32)
    assert eos_positions(jnp.asarray(ids), eos_token_id).tolist() == expected
    ref = tiny_clip_model({**TINY_CLIP_TEXT, "eos_token_id": eos_token_id})
    ours = CLIPTextWithProjection(CLIPTextConfig.from_transformers(ref.config.to_dict()))
    params = flax_params(ours, ref, jnp.asarray(ids))
    actual = ours.apply({"params": params}, jnp.asarray(ids))
    assert rel_err(actual, clip_text_features(ref, ids, np.ones_like(ids))) < TOL


def test_config_from_clip_model_and_text_dicts():
    legacy = {"projection_dim": 768, "text_config": {"hidden_size": 512, "eos_token_id": 2},
              "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}}
    assert CLIPTextConfig.from_transformers(legacy) == VIT_L14
    text_only = {"hidden_size": 64, "projection_dim": 16, "architectures": ["CLIPTextModelWithProjection"]}
    assert CLIPTextConfig.from_transformers(text_only) == CLIPTextConfig(hidden_size=64, projection_dim=16)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextConfig.from_transformers({"hidden_act": "relu"})


def test_vit_l14_parameter_layout():
    from transformers import CLIPTextConfig as TorchConfig
    from transformers import CLIPTextModelWithProjection

    ids = jnp.zeros((1, 77), jnp.int32)
    shapes = jax.eval_shape(CLIPTextWithProjection(VIT_L14).init, jax.random.PRNGKey(0), ids)["params"]
    layout = to_state_dict(shapes, convert=lambda s: np.empty(s.shape, np.uint8))  # torch names and shapes
    ours = {k: v.shape for k, v in layout.items()}
    with torch.device("meta"):
        ref = CLIPTextModelWithProjection(TorchConfig(hidden_size=768, intermediate_size=3072,
                                                      num_attention_heads=12, projection_dim=768))
    assert ours == {k: tuple(p.shape) for k, p in ref.named_parameters()}
    assert sum(int(np.prod(s)) for s in ours.values()) == 123_650_304


@pytest.mark.parametrize("safetensors", [True, False])
def test_load_clip_folder(tmp_path, safetensors):
    folder = write_tiny_clip_folder(tmp_path / "clip")
    ref = tiny_clip_model()
    if not safetensors:
        (folder / "model.safetensors").unlink()
        ref.save_pretrained(folder, safe_serialization=False)
    config, params, tokenizer = load_clip_folder(folder)
    assert config == CLIPTextConfig.from_transformers(ref.config.to_dict())
    tokens = tokenizer(TEXTS, padding="max_length", max_length=77, return_tensors="np")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    actual = CLIPTextWithProjection(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(actual, clip_text_features(ref, ids, mask)) < TOL


def test_load_clip_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_clip_folder(tmp_path / "nowhere")
    folder = write_tiny_clip_folder(tmp_path / "clip")
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        load_clip_folder(folder)
    from safetensors.numpy import load_file, save_file

    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "text_projection.weight"}, folder / "model.safetensors")
    with pytest.raises(WeightsError, match="text_projection"):
        load_clip_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip_folder(folder)
