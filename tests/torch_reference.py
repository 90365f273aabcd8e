"""A PyTorch rendering of the authors' DP-IQA teacher, written from SPEC.md: the tests' oracle.

Attribute names are the authors', so state dicts carry every key of their checkpoints,
including the QFD's `bnc1` and `classifier_dist`, which the forward pass never uses.
Widths are parameters so that tests can build tiny models.
"""
import torch
import torch.nn.functional as F
import torchvision
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.adapter import FullAdapter
from torch import nn

GAMMA_INIT = 1e-4
DIST_CLASSES = 24  # classifier_dist's outputs (unused head kept for its state-dict keys)


def tiny_qfd_kwargs() -> dict:
    """Small QFD widths; the same keywords fit TorchQFD and the Flax QualityFeatureDecoder."""
    return {"width": 16, "reduction": 4, "score_channels": (16, 12, 8), "fc_width": 16}


class TorchTextAdapter(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, embeddings):
        return self.fc(embeddings)


class TorchSE(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class TorchQFD(nn.Module):
    """forward([f1, f2, f3, f4]) NCHW -> (score (B, 1), feature map (B, C, map_size, map_size))."""

    def __init__(self, in_channels=(320, 640, 1280, 1280), map_size: int = 64, width: int = 512,
                 reduction: int = 16, score_channels=(128, 32, 8), fc_width: int = 512):
        super().__init__()
        self.map_size = map_size
        for i, channels in enumerate(in_channels, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(channels, width, kernel_size=3, padding=1))
            setattr(self, f"se{i}", TorchSE(width, reduction))
        self.fuse_conv = nn.Conv2d(width * len(in_channels), width, kernel_size=3, padding=1)
        self.se_fuse = TorchSE(width, reduction)
        self.bnc1 = nn.BatchNorm2d(width)
        widths = (width, *score_channels)
        for i in range(len(score_channels)):
            setattr(self, f"conv_score{i + 1}", nn.Conv2d(widths[i], widths[i + 1], kernel_size=1))
        self.fc1 = nn.Linear(score_channels[-1] * map_size * map_size, fc_width)
        self.fc2 = nn.Linear(fc_width, fc_width)
        self.fc3 = nn.Linear(fc_width, 1)
        self.classifier_dist = nn.Linear(fc_width, DIST_CLASSES)
        self.num_score_convs = len(score_channels)

    def forward(self, features):
        branches = []
        for i, f in enumerate(features, start=1):
            f = F.interpolate(f, size=(self.map_size, self.map_size), mode="bicubic", align_corners=False)
            branches.append(getattr(self, f"se{i}")(getattr(self, f"conv{i}")(f)))
        x = self.se_fuse(self.fuse_conv(torch.cat(branches, dim=1)))
        for i in range(1, self.num_score_convs + 1):
            x = F.relu(getattr(self, f"conv_score{i}")(x))
        feature_map = x
        score = F.relu(self.fc1(x.flatten(1)))
        score = self.fc3(F.relu(self.fc2(score)))
        return score, feature_map


class TorchDPIQA(nn.Module):
    """The teacher: VAE latents -> U-Net with text and image adapters -> QFD on the up-block outputs."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, qfd_kwargs: dict,
                 adapter_res_blocks: int = 2):
        super().__init__()
        channels = list(unet.config.block_out_channels)
        dim = unet.config.cross_attention_dim
        self.vae = vae.requires_grad_(False)
        self.unet = unet
        self.img_adapter = FullAdapter(in_channels=3, channels=channels, num_res_blocks=adapter_res_blocks,
                                       downscale_factor=2 ** (len(vae.config.block_out_channels) - 1))
        self.text_adapter = TorchTextAdapter(dim)
        self.gamma = nn.Parameter(torch.full((dim,), GAMMA_INIT))
        self.QFD = TorchQFD(in_channels=tuple(channels), **qfd_kwargs)

    def forward(self, x, prompt_embeddings, latent: str = "mean", generator=None):
        """x (B, 3, H, W) in [0, 1]; prompt_embeddings (P, D); latent 'mean' or 'sample'."""
        posterior = self.vae.encode(x).latent_dist
        if latent not in ("mean", "sample"):
            raise ValueError(f"latent must be 'mean' or 'sample', not {latent!r}")
        z = posterior.mean if latent == "mean" else posterior.sample(generator=generator)
        latents = z * self.vae.config.scaling_factor
        context = prompt_embeddings + self.gamma * self.text_adapter(prompt_embeddings)
        context = context[None].expand(x.shape[0], -1, -1)
        residuals = self.img_adapter(x)
        ups = []
        hooks = [block.register_forward_hook(lambda _m, _i, out: ups.append(out))
                 for block in self.unet.up_blocks]
        try:  # the U-Net pops the residuals and adds some in place: hand it copies
            self.unet(latents, 1, encoder_hidden_states=context,
                      down_intrablock_additional_residuals=[r.clone() for r in residuals])
        finally:
            for hook in hooks:
                hook.remove()
        u0, u1, u2, u3 = ups
        return self.QFD([u3, u2, u1, u0])


def build_torch_dpiqa(unet_config: dict, vae_config: dict, qfd_kwargs: dict,
                      adapter_res_blocks: int = 2) -> TorchDPIQA:
    """A randomly initialised teacher. The QFD's map_size defaults to the U-Net's sample_size
    (the latent side), else 64; `qfd_kwargs` may set it and any width of TorchQFD. The authors'
    image adapter has 2 residual units per block; the demo's tiny teacher has 1."""
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    sample_size = unet.config.sample_size
    kwargs = {"map_size": sample_size if isinstance(sample_size, int) else 64, **qfd_kwargs}
    return TorchDPIQA(vae, unet, kwargs, adapter_res_blocks).eval()


class TorchStudent(nn.Module):
    """SPEC.md's student: torchvision EfficientNet with its avgpool and classifier removed ->
    ConvTranspose2d(C -> 8, 3, stride 2, padding 1, output padding 1) -> ReLU -> nearest resize to
    map_size -> flatten (C, H, W) -> fc1 -> ReLU -> fc2 -> ReLU -> fc3."""

    def __init__(self, variant: str = "b7", map_size: int = 64, fc_width: int = 512):
        super().__init__()
        self.base_model = getattr(torchvision.models, f"efficientnet_{variant}")(weights=None)
        channels = self.base_model.classifier[1].in_features
        self.base_model.avgpool, self.base_model.classifier = nn.Identity(), nn.Identity()
        self.conv_transpose = nn.ConvTranspose2d(channels, 8, 3, stride=2, padding=1, output_padding=1)
        self.fc1 = nn.Linear(8 * map_size * map_size, fc_width)
        self.fc2 = nn.Linear(fc_width, fc_width)
        self.fc3 = nn.Linear(fc_width, 1)
        self.map_size = map_size

    def forward(self, x):
        side = self.map_size // 4  # the features' side; the headless model returns them flattened
        features = self.base_model(x).view(x.shape[0], -1, side, side)
        feature_map = F.interpolate(F.relu(self.conv_transpose(features)), size=(self.map_size,) * 2,
                                    mode="nearest")
        x = F.relu(self.fc2(F.relu(self.fc1(feature_map.flatten(1)))))
        return self.fc3(x), feature_map
