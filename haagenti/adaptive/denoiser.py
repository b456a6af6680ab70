"""A small DDPM trained on scikit-learn's 8x8 digits, a DDIM sampler, and a denoiser that
switches weight precision per step as a schedule says."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from haagenti.adaptive.precision import Precision
from haagenti.adaptive.quantize import QuantizedWeights
from haagenti.adaptive.schedule import PrecisionSchedule

T = 1000


def betas() -> torch.Tensor:
    return torch.linspace(1e-4, 0.02, T)


def alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1 - betas(), 0)


class DigitsDenoiser(nn.Module):
    """eps-prediction MLP on 64 pixels with a sinusoidal timestep embedding."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.time = nn.Linear(64, width)
        self.inp = nn.Linear(64, width)
        self.mid1 = nn.Linear(width, width)
        self.mid2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        emb = torch.cat([torch.sin(t[:, None].float() * freqs), torch.cos(t[:, None].float() * freqs)], 1)
        h = nn.functional.silu(self.inp(x) + self.time(emb))
        h = h + nn.functional.silu(self.mid1(h))
        h = h + nn.functional.silu(self.mid2(h))
        return self.out(h)


def digits_images() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float32)  # [-1, 1]


def train_denoiser(iters: int = 4000, seed: int = 0, width: int = 512) -> DigitsDenoiser:
    torch.manual_seed(seed)
    x0 = digits_images()
    model = DigitsDenoiser(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    ab = alphas_cumprod()
    for _ in range(iters):
        idx = torch.randint(0, len(x0), (256,))
        t = torch.randint(0, T, (256,))
        noise = torch.randn(256, 64)
        a = ab[t][:, None]
        loss = nn.functional.mse_loss(model(a.sqrt() * x0[idx] + (1 - a).sqrt() * noise, t), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def ddim_timesteps(steps: int) -> list[int]:
    return [int(round(x)) for x in torch.linspace(T - 1, 0, steps).tolist()]


def sigmas_for(timesteps: list[int]) -> list[float]:
    """diffusers-style sigma = sqrt((1 - a_bar) / a_bar) per step: noise relative to signal."""
    ab = alphas_cumprod()
    return [math.sqrt((1 - ab[t]) / ab[t]) for t in timesteps]


@dataclass
class SampleRun:
    images: torch.Tensor
    seconds: float
    weight_bytes_per_step: list[int]


class ScheduledDenoiser:
    """Runs DDIM with each step's weights at the schedule's precision. Each precision's weights
    are built once and cached; a blending step runs both precisions and mixes the outputs."""

    def __init__(self, model: DigitsDenoiser):
        self.model = model
        self.cache: dict[Precision, QuantizedWeights] = {}

    def weights(self, p: Precision) -> QuantizedWeights:
        if p not in self.cache:
            self.cache[p] = QuantizedWeights(self.model, p)
        return self.cache[p]

    def _eps(self, p: Precision, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.weights(p).parameters(), (x, t))

    @torch.no_grad()
    def sample(self, schedule: PrecisionSchedule, noise: torch.Tensor) -> SampleRun:
        steps = len(schedule)
        ts = ddim_timesteps(steps)
        ab = alphas_cumprod()
        x = noise.clone()
        touched = []
        for p in {s.precision for s in schedule.steps} | {s.previous for s in schedule.steps if s.previous}:
            self.weights(p)  # build outside the timed loop, as a deployment would at load
        start = time.perf_counter()
        for i, t in enumerate(ts):
            sp = schedule.steps[i]
            tt = torch.full((x.shape[0],), t)
            eps = self._eps(sp.precision, x, tt)
            nbytes = self.weights(sp.precision).weight_bytes
            if sp.previous is not None and sp.blend < 1:
                eps = sp.blend * eps + (1 - sp.blend) * self._eps(sp.previous, x, tt)
                nbytes += self.weights(sp.previous).weight_bytes
            touched.append(nbytes)
            a = ab[t]
            a_prev = ab[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return SampleRun(x.clamp(-1, 1), time.perf_counter() - start, touched)
