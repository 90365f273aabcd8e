"""Load CLIP's text tower and tokenizer from a local transformers folder (never the network).

The folder is what `CLIPModel.save_pretrained` writes (e.g. openai/clip-vit-large-patch14):
`config.json`, `model.safetensors` (or `pytorch_model.bin`, read with torch when installed) and
the tokenizer files (`vocab.json` + `merges.txt`, or `tokenizer.json`). Vision-tower keys are ignored.
"""
from pathlib import Path

import jax
import jax.numpy as jnp

from dpiqa_jax.models.clip_text import CLIPTextConfig, CLIPTextWithProjection
from dpiqa_jax.weights.diffusers import read_json
from dpiqa_jax.weights.torch_files import read_tensors
from dpiqa_jax.weights.torch_names import WeightsError, load_state_dict

EXPECTED = "a transformers CLIP folder (config.json, model.safetensors, vocab.json + merges.txt)"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {' or '.join(WEIGHT_FILES)}: expected {EXPECTED}")


def load_clip_tokenizer(folder):
    """transformers' CLIPTokenizer from the folder's own files (local only)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    # Without its files CLIPTokenizer silently builds a 3-token vocabulary: check first.
    if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt, or "
                                f"tokenizer.json): expected {EXPECTED}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{folder}: unreadable CLIP tokenizer files ({reason})") from None


def load_clip_folder(path):
    """-> (CLIPTextConfig, float32 params of `CLIPTextWithProjection(config)`, CLIPTokenizer)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected {EXPECTED}")
    config_path = folder / "config.json"
    config_dict = read_json(config_path, EXPECTED)
    try:
        config = CLIPTextConfig.from_transformers(config_dict)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_path}: {e}") from None
    weights = _weights_file(folder)
    state = read_tensors(str(weights))
    if "text_projection.weight" not in state:
        raise WeightsError(f"{weights}: no text_projection.weight; DP-IQA needs the projected features of a "
                           "CLIPModel or CLIPTextModelWithProjection (a plain CLIPTextModel has none)")
    ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
    shapes = jax.eval_shape(CLIPTextWithProjection(config).init, jax.random.PRNGKey(0), ids)["params"]
    params = load_state_dict(shapes, state, source=str(weights))
    return config, params, load_clip_tokenizer(folder)
