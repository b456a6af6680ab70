"""The denoisers the schedules are measured on, as diffusers models trained here on
scikit-learn's digits (no downloads): a UNet2DModel on digits upscaled to 16x16 (164k
parameters), a larger one on digits upscaled to 32x32 (6.3 M parameters: does what was measured
on the small one hold at scale?) and the original MLP on 8x8, all eps-predicting under diffusers'
DDPM noise schedule."""
from __future__ import annotations

import math
import os

import torch

from haagenti.extras import require

require("adaptive")
from diffusers import DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

TRAIN_STEPS = 1000  # DDPM linear betas 1e-4..0.02, diffusers' default
KINDS = ("unet", "mlp", "unet5m")
UNET5M_BATCH = 48


class DigitsMLP(ModelMixin, ConfigMixin):
    """eps-prediction MLP on size x size pixels with a sinusoidal timestep embedding; the
    project's first denoiser, now callable like a diffusers UNet: (sample, timestep) -> .sample."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, width: int = 512):
        super().__init__()
        n = in_channels * sample_size * sample_size
        self.time = nn.Linear(64, width)
        self.inp = nn.Linear(n, width)
        self.mid1 = nn.Linear(width, width)
        self.mid2 = nn.Linear(width, width)
        self.out = nn.Linear(width, n)

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        b = sample.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        freqs = torch.exp(-math.log(10000) * torch.arange(32, device=sample.device) / 32)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1)
        h = nn.functional.silu(self.inp(sample.reshape(b, -1)) + self.time(emb))
        h = h + nn.functional.silu(self.mid1(h))
        h = h + nn.functional.silu(self.mid2(h))
        out = self.out(h).reshape(sample.shape)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def digits(size: int = 8) -> torch.Tensor:
    """scikit-learn's 1797 digits in [-1, 1] as [N, 1, size, size] (bilinear upscaling)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x


def digit_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target)


def unet(sample_size: int = 16, channels: tuple[int, ...] = (16, 32)) -> UNet2DModel:
    """A UNet2DModel with one level per channel count (ResNet blocks, self-attention in the
    middle block)."""
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8,
    )


def unet5m() -> UNet2DModel:
    """6.3 M parameters at 32x32, most of them in the 4x4 level and the middle block: 0.2 GMAC
    per image, so it trains and samples on one CPU thread within a bench run (a UNet with wide
    32x32 levels costs 2x the multiply-adds per parameter count)."""
    return unet(32, (16, 32, 64, 224))


def train(model: nn.Module, images: torch.Tensor, iters: int, seed: int = 0, batch: int = 128, lr: float = 2e-3, progress=None) -> nn.Module:
    """Standard DDPM training (eps MSE at uniform timesteps), cosine learning rate."""
    torch.manual_seed(seed)
    noise_sched = DDPMScheduler(num_train_timesteps=TRAIN_STEPS)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    model.train()
    for _ in range(iters):
        x0 = images[torch.randint(0, len(images), (batch,))]
        t = torch.randint(0, TRAIN_STEPS, (batch,))
        noise = torch.randn_like(x0)
        loss = nn.functional.mse_loss(model(noise_sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_sched.step()
        if progress is not None:
            progress()
    return model.eval()


def load_or_train(kind: str, folder: str, iters: int, progress=None) -> nn.Module:
    """The model saved as a diffusers folder at `folder`, trained there first if absent."""
    cls = DigitsMLP if kind == "mlp" else UNet2DModel
    if os.path.exists(os.path.join(folder, "config.json")):
        return cls.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    if kind == "unet":
        model = train(unet(), digits(16), iters, batch=96, progress=progress)
    elif kind == "unet5m":
        model = train(unet5m(), digits(32), iters, batch=UNET5M_BATCH, lr=1e-3, progress=progress)
    else:
        model = train(DigitsMLP(), digits(8), iters, batch=256, lr=1e-3, progress=progress)
    model.save_pretrained(folder)
    return model
