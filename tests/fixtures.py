"""Tiny local model folders for tests, written the way the real ones are (diffusers and
transformers `save_pretrained`), from random torch models with every parameter perturbed.

- `write_tiny_sd_folder(path)`: a diffusers SD-1.5-like folder with `unet/` and `vae/`.
- `write_tiny_clip_folder(path)`: a transformers CLIPModel folder with a byte-level CLIP tokenizer
  (no merges: every character is a token, so any prompt tokenises offline).
"""
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from oracle import randomize_
from tokenizers import pre_tokenizers

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=2,
    cross_attention_dim=32,
)

TINY_VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.18215,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The 256 byte symbols and their end-of-word forms, then the two special tokens (ids 512, 513),
# in the order of the real CLIP vocabulary (which has its merges between them).
_BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
TINY_CLIP_VOCAB = {s: i for i, s in enumerate(_BYTES + [s + "</w>" for s in _BYTES] + [BOS, EOS])}

TINY_CLIP_TEXT = dict(
    vocab_size=len(TINY_CLIP_VOCAB),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=TINY_CLIP_VOCAB[BOS],
    eos_token_id=TINY_CLIP_VOCAB[EOS],
    pad_token_id=TINY_CLIP_VOCAB[EOS],
)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        image_size=32, patch_size=16, projection_dim=32)


def write_tiny_sd_folder(path, unet_config: dict = TINY_UNET, vae_config: dict = TINY_VAE, seed: int = 0,
                         variant: Optional[str] = None) -> Path:
    """`path/unet` and `path/vae` as diffusers saves them. `variant='fp16'` stores float16 weights
    under `diffusion_pytorch_model.fp16.safetensors`, as the fp16 branch of SD-1.5 does."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(path)
    for sub, cls, config in (("unet", UNet2DConditionModel, unet_config), ("vae", AutoencoderKL, vae_config)):
        torch.manual_seed(seed)
        model = randomize_(cls(**config), seed=seed)
        if variant == "fp16":
            model = model.half()
        model.save_pretrained(path / sub, safe_serialization=True, variant=variant)
    return path


def write_tiny_clip_tokenizer(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(TINY_CLIP_VOCAB, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    config = dict(tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token=BOS, eos_token=EOS,
                  pad_token=EOS, unk_token=EOS)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def tiny_clip_model(text_config: dict = TINY_CLIP_TEXT, seed: int = 0):
    """A randomised transformers CLIPModel (the oracle of the CLIP tests)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=text_config, vision_config=TINY_CLIP_VISION,
                        projection_dim=text_config["projection_dim"])
    torch.manual_seed(seed)
    return randomize_(CLIPModel(config), seed=seed)


def clip_text_features(model, ids, mask) -> np.ndarray:
    """transformers' `get_text_features` as numpy (transformers 5 wraps it in a model output)."""
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def write_tiny_clip_folder(path, text_config: dict = TINY_CLIP_TEXT, seed: int = 0) -> Path:
    """A CLIPModel folder (config.json + model.safetensors) with its tokenizer files."""
    path = Path(path)
    tiny_clip_model(text_config, seed).save_pretrained(path, safe_serialization=True)
    return write_tiny_clip_tokenizer(path)
