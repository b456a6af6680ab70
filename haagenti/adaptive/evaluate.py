"""Measure schedules against all-FP32 sampling with the same noise: PSNR and SSIM of samples,
agreement and confidence of a digits classifier, weight bytes touched per step, wall time."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from haagenti.adaptive.denoiser import DigitsDenoiser, ScheduledDenoiser
from haagenti.adaptive.precision import Precision, PrecisionCapabilities
from haagenti.adaptive.profile import PrecisionProfile, ProfilePreset
from haagenti.adaptive.schedule import PrecisionSchedule, ScheduleConfig, StepPrecision, TransitionPlanner


@dataclass
class ScheduleResult:
    name: str
    psnr_db: float  # vs FP32 samples, images in [0, 1]
    ssim: float
    class_agreement: float  # share of samples the classifier labels as it labels the FP32 sample
    confidence: float  # mean top-class probability (FP32 reference in the 'fp32' row)
    nn_psnr_db: float  # mean PSNR of each sample to its nearest training image (data fidelity)
    weight_bytes_vs_fp16: float  # weight bytes touched over the generation / all-FP16
    seconds: float

    def row(self) -> dict:
        return asdict(self)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((((a + 1) / 2 - (b + 1) / 2) ** 2).mean())
    return 10 * np.log10(1 / mse) if mse > 0 else float("inf")


def nn_psnr(samples: torch.Tensor, train: torch.Tensor) -> float:
    """Mean over samples of the PSNR to the closest training image: how data-like samples are,
    so that 'PSNR loss versus FP32 sampling' has a reference that is not FP32 itself."""
    x, y = (samples + 1) / 2, (train + 1) / 2
    mse = torch.cdist(x, y).pow(2).min(1).values / x.shape[1]
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM over images, one 8x8 window each (the images are 8x8)."""
    x, y = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    mx, my = x.mean(1), y.mean(1)
    vx, vy = x.var(1, unbiased=False), y.var(1, unbiased=False)
    cov = ((x - mx[:, None]) * (y - my[:, None])).mean(1)
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def digits_classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=2000).fit(d.data / 8.0 - 1.0, d.target)


def uniform(precision: Precision, steps: int) -> PrecisionSchedule:
    return PrecisionSchedule([StepPrecision(i, precision) for i in range(steps)], [], precision.value)


def window_schedule(steps: int, start: int, width: int, low: Precision, base: Precision = Precision.FP32) -> PrecisionSchedule:
    s = [StepPrecision(i, low if start <= i < start + width else base) for i in range(steps)]
    return PrecisionSchedule(s, [], f"{low.value}@{start}-{start + width - 1}")


class Evaluator:
    def __init__(self, model: DigitsDenoiser, steps: int = 30, samples: int = 512, seed: int = 0):
        self.steps = steps
        self.runner = ScheduledDenoiser(model)
        self.noise = torch.randn(samples, 64, generator=torch.Generator().manual_seed(seed))
        self.clf = digits_classifier()
        from haagenti.adaptive.denoiser import digits_images

        self.train = digits_images()
        self.reference = self.runner.sample(uniform(Precision.FP32, steps), self.noise)
        self.ref_labels = self.clf.predict(self.reference.images.numpy())
        fp16 = self.runner.weights(Precision.FP16).weight_bytes
        self.fp16_bytes = fp16 * steps

    def evaluate(self, schedule: PrecisionSchedule) -> ScheduleResult:
        run = self.runner.sample(schedule, self.noise)
        probs = self.clf.predict_proba(run.images.numpy())
        return ScheduleResult(
            schedule.name,
            psnr(run.images, self.reference.images),
            ssim(run.images, self.reference.images),
            float((probs.argmax(1) == self.ref_labels).mean()),
            float(probs.max(1).mean()),
            nn_psnr(run.images, self.train),
            sum(run.weight_bytes_per_step) / self.fp16_bytes,
            run.seconds,
        )

    def presets(self) -> list[ScheduleResult]:
        from haagenti.adaptive.denoiser import ddim_timesteps, sigmas_for

        sig = tuple(sigmas_for(ddim_timesteps(self.steps)))
        out = [self.evaluate(uniform(p, self.steps)) for p in (Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.INT4)]
        for preset in ProfilePreset:
            cfg = ScheduleConfig(self.steps, preset.profile(), PrecisionCapabilities.cpu(), sigmas=sig)
            out.append(self.evaluate(TransitionPlanner().plan(cfg)))
        return out

    def seed_schedule(self) -> PrecisionSchedule:
        """The seed's assumption for contrast: low precision early, full precision late."""
        prof = PrecisionProfile.by_fraction("seed-balanced", (0.0, 0.3, "int4"), (0.3, 0.7, "int8"), (0.7, 1.0, "fp16"))
        return TransitionPlanner().plan(ScheduleConfig(self.steps, prof))

    def find_target(self, max_bytes: float = 0.5, max_loss_db: float = 1.0) -> tuple[ScheduleResult | None, list[ScheduleResult]]:
        """Search INT8-then-INT4 schedules (the measured-safe order) for one touching at most
        `max_bytes` of all-FP16 weight bytes with at most `max_loss_db` nearest-neighbour PSNR
        lost against FP32 sampling. Returns the best found (or None) and every candidate."""
        ref = self.evaluate(uniform(Precision.FP32, self.steps)).nn_psnr_db
        tried = []
        for switch in (0.5, 0.6, 0.7, 0.8, 0.9):
            prof = PrecisionProfile.by_fraction(f"int8->int4@{switch}", (0.0, switch, "int8"), (switch, 1.0, "int4"))
            r = self.evaluate(TransitionPlanner().plan(ScheduleConfig(self.steps, prof)))
            tried.append(r)
        ok = [r for r in tried if r.weight_bytes_vs_fp16 <= max_bytes and ref - r.nn_psnr_db <= max_loss_db]
        return (max(ok, key=lambda r: r.psnr_db) if ok else None), tried

    def sensitivity(self, windows: int = 5) -> list[dict]:
        """PSNR lost by quantising one window of steps (the rest FP32), early to late."""
        width = self.steps // windows
        rows = []
        for k in range(windows):
            row = {"window": k, "steps": f"{k * width}-{(k + 1) * width - 1}"}
            for low in (Precision.INT8, Precision.INT4):
                r = self.evaluate(window_schedule(self.steps, k * width, width, low))
                row[f"{low.value}_psnr_db"] = r.psnr_db
                row[f"{low.value}_agreement"] = r.class_agreement
            rows.append(row)
        return rows


def quality_factors(results: list[ScheduleResult]) -> dict[str, float]:
    """Measured replacements for the seed's guessed constants (INT4 0.92, INT8 0.97, FP16
    0.998): the classifier agreement of all-steps-at-that-precision sampling with FP32."""
    return {r.name: r.class_agreement for r in results if r.name in {p.value for p in Precision}}


def custom_profile(name: str, zones: list[tuple[float, float, str]]) -> PrecisionProfile:
    return PrecisionProfile.by_fraction(name, *zones)
