"""Quality metrics a diffusion user trusts, on the digits: PSNR and SSIM against full-precision
samples from the same noise, a Frechet distance on the features of a small digits classifier
(FID-style: FID's Inception features do not fit 16x16 digits), class agreement, and NN-PSNR
(each sample's PSNR to its nearest training image: data fidelity with no FP32 reference)."""
from __future__ import annotations

import os

import numpy as np
import torch
from scipy import linalg
from torch import nn

from haagenti.adaptive.models import digit_labels, digits


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() + 1) / 2  # [-1, 1] -> [0, 1]


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((_unit(a) - _unit(b)) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    m = mse(a, b)
    return 10 * np.log10(1 / m) if m > 0 else float("inf")


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) with a Gaussian window over [N, 1, H, W] images in [-1, 1];
    the window shrinks to the image on 8x8 digits."""
    x, y = _unit(a), _unit(b)
    w = min(window, x.shape[-1])
    g = torch.exp(-((torch.arange(w) - (w - 1) / 2) ** 2) / (2 * sigma**2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    f = lambda t: nn.functional.conv2d(t, k)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cov = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def nn_psnr(samples: torch.Tensor, train: torch.Tensor) -> float:
    x, y = _unit(samples).flatten(1), _unit(train).flatten(1)
    m = torch.cdist(x, y).pow(2).min(1).values / x.shape[1]
    return float((10 * torch.log10(1 / m.clamp_min(1e-12))).mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class DigitsClassifier(nn.Module):
    """A small CNN (any image size): 64 features, then 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.feat = nn.Sequential(nn.Linear(512, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(size: int, iters: int = 400, seed: int = 0, holdout: int = 297) -> tuple[DigitsClassifier, float]:
    """Train on all but the last `holdout` digits; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    x, y = digits(size), digit_labels()
    xt, yt, xv, yv = x[:-holdout], y[:-holdout], x[-holdout:], y[-holdout:]
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(iters):
        i = torch.randint(0, len(xt), (128,))
        loss = nn.functional.cross_entropy(clf(xt[i] + 0.05 * torch.randn_like(xt[i])), yt[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(xv).argmax(1) == yv).float().mean())
    return clf, acc


def load_or_train_classifier(path: str | None, size: int) -> tuple[DigitsClassifier, float]:
    """The classifier cached at `path` (safetensors; accuracy in its metadata), trained if absent."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    if path and os.path.exists(path):
        clf = DigitsClassifier()
        clf.load_state_dict(load_file(path))
        with safe_open(path, "pt") as f:
            return clf.eval(), float(f.metadata()["accuracy"])
    clf, acc = train_classifier(size)
    if path:
        save_file(clf.state_dict(), path, metadata={"accuracy": str(acc)})
    return clf, acc
