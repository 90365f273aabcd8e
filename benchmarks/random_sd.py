"""A local diffusers folder (unet/, vae/) with random weights in the shapes of a config's teacher,
written by diffusers' own classes: on a machine without SD-1.5's weights, `startup.py --sd-dir`
then times a first run's read of a folder of the real size (3.4 GB U-Net + 0.3 GB VAE for
configs/default.py).

    python benchmarks/random_sd.py /tmp/sd15                                   # SD-1.5's shapes
    python benchmarks/random_sd.py /tmp/sd_tiny --config configs/demo.py:smoke  # the demo's
"""
import argparse
import sys

from speed import REPO, diffusers_configs

from dpiqa_jax.teacher import teacher_config_from_dict
from dpiqa_jax.train.config_util import load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--config", default=str(REPO / "configs" / "default.py"))
    args = p.parse_args(argv)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet, vae = diffusers_configs(teacher_config_from_dict(load_config(args.config).model.arch.to_dict()))
    UNet2DConditionModel(**unet).save_pretrained(f"{args.folder}/unet")
    AutoencoderKL(**vae).save_pretrained(f"{args.folder}/vae")
    print(f"random_sd: {args.folder} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
