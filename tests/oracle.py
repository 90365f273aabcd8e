"""Helpers for parity tests against PyTorch modules (the oracle)."""
import jax
import numpy as np
import torch

from dpiqa_jax.weights.torch_names import load_state_dict


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, so that zero/one initialisations cannot hide a mapping bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + scale * noise)
            elif p.ndim == 1:
                p.copy_(scale * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / np.sqrt(fan_in))
    return module.eval()


def state_numpy(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def flax_params(flax_module, torch_module, *init_args, prefix: str = "", **init_kwargs):
    """Flax params for `flax_module` loaded from `torch_module`'s state dict."""
    shapes = jax.eval_shape(flax_module.init, jax.random.PRNGKey(0), *init_args, **init_kwargs)
    return load_state_dict(shapes["params"], state_numpy(torch_module), prefix=prefix)


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)
