"""Install with `pip install -e .` (add `[test]` for the parity oracle and test tools)."""
from setuptools import find_packages, setup

setup(
    name="dpiqa_jax",
    version="0.1.0",
    description="DP-IQA (diffusion-prior blind image quality assessment) in JAX/Flax",
    packages=find_packages(include=["dpiqa_jax", "dpiqa_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections>=1.1",
        "tensorflow-cpu==2.21.0",
        "tensorflow-datasets==4.9.10",
        "numpy>=2.0",
        "scipy>=1.13",
        "safetensors>=0.4",
        "pillow>=10",
        "tqdm",
        "matplotlib>=3.8",  # evaluate's scatter plots
        "openpyxl",
        # synthetic_iqa: reference photos shipped in its wheel, and SSIM labels.
        "scikit-image>=0.22",
        "importlib_resources",  # tensorflow-datasets needs it to build datasets
        # Configs and the CLIP tokenizer of a local SD / CLIP folder (no torch needed for these).
        "transformers>=4.40",
        "diffusers>=0.30",
    ],
    extras_require={
        # JAX's accelerator plugins, the same version as jax: NVIDIA GPUs (CUDA 12 or 13) and TPU VMs.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # torch is only the parity oracle of the tests and the reader of the authors' .pth files.
        "torch": ["torch==2.14.1"],
        "test": ["torch==2.14.1", "torchvision==0.29.1", "pytest", "pytest-xdist", "ruff",
                 "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": ["dpiqa-jax=dpiqa_jax.cli:run_as_command"]},
)
