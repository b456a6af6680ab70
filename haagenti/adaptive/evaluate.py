"""Measure schedules on a trained denoiser inside a diffusers pipeline: every schedule samples
from the same noise (initial and, for ancestral samplers, per-step) as the all-FP32 reference."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from haagenti.adaptive.metrics import frechet, load_or_train_classifier, mse, nn_psnr, psnr, ssim
from haagenti.adaptive.models import digits
from haagenti.adaptive.precision import Precision
from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler
from haagenti.adaptive.schedule import PrecisionSchedule, StepPrecision
from haagenti.adaptive.switch import PrecisionSwitcher


@dataclass
class ScheduleResult:
    name: str
    psnr_db: float  # vs FP32 samples from the same noise, images in [0, 1]
    ssim: float
    mse: float  # vs FP32 samples: the quantity the search assumes adds up over steps
    class_agreement: float  # share of samples labelled as their FP32 twin
    frechet: float  # Frechet distance of classifier features to the training digits
    nn_psnr_db: float  # mean PSNR of each sample to its nearest training image
    weight_bytes_vs_fp16: float  # weight bytes touched over the generation / all-FP16
    seconds: float

    def row(self) -> dict:
        return asdict(self)


def uniform(precision: Precision, steps: int) -> PrecisionSchedule:
    return PrecisionSchedule([StepPrecision(i, precision) for i in range(steps)], [], precision.value)


def window_schedule(steps: int, start: int, end: int, low: Precision, base: Precision = Precision.FP32) -> PrecisionSchedule:
    s = [StepPrecision(i, low if start <= i < end else base) for i in range(steps)]
    return PrecisionSchedule(s, [], f"{low.value}@{start}-{end - 1}")


class Evaluator:
    """One model, one sampler, `samples` images per schedule in one batch (seeded)."""

    def __init__(self, model, sampler: str, steps: int = 20, samples: int = 512, seed: int = 0, classifier_path: str | None = None,
                 switcher: Callable[..., PrecisionSwitcher] = PrecisionSwitcher):
        """`switcher(model, scheduler, schedule)` makes the switcher every schedule runs under."""
        self.sampler, self.steps, self.samples, self.seed = sampler, steps, samples, seed
        self.pipe = DigitsPipeline(model, make_scheduler(sampler))
        self.pipe.set_progress_bar_config(disable=True)
        self.switcher = switcher(model, self.pipe.scheduler, uniform(Precision.FP32, steps))
        size = model.config.sample_size
        self.data = digits(size)
        self.classifier, self.classifier_accuracy = load_or_train_classifier(classifier_path, size)
        with torch.no_grad():
            self.data_features = self.classifier.features(self.data).numpy()
        self.fp16_bytes = self.switcher.weight_bytes_at(Precision.FP16)
        self.reference = self._sample(uniform(Precision.FP32, steps))[0]
        with torch.no_grad():
            self.ref_labels = self.classifier(self.reference).argmax(1)

    def _sample(self, schedule: PrecisionSchedule) -> tuple[torch.Tensor, float, float]:
        self.switcher.schedule = schedule
        with self.switcher:
            start = time.perf_counter()
            images = self.pipe(self.samples, self.steps, torch.Generator().manual_seed(self.seed)).images
            seconds = time.perf_counter() - start
        touched = self.switcher.weight_bytes() / (self.fp16_bytes * len(self.switcher.calls))
        return images, touched, seconds

    def evaluate(self, schedule: PrecisionSchedule) -> ScheduleResult:
        images, touched, seconds = self._sample(schedule)
        ref = self.reference
        with torch.no_grad():
            labels = self.classifier(images).argmax(1)
            feats = self.classifier.features(images).numpy()
        return ScheduleResult(
            schedule.name, psnr(images, ref), ssim(images, ref), mse(images, ref), float((labels == self.ref_labels).float().mean()),
            frechet(feats, self.data_features), nn_psnr(images, self.data), touched, seconds,
        )

    def frechet_other_seed(self) -> float:
        """FP32 samples from other noise: how far the Frechet distance moves by chance alone."""
        self.switcher.schedule = uniform(Precision.FP32, self.steps)
        with self.switcher, torch.no_grad():
            images = self.pipe(self.samples, self.steps, torch.Generator().manual_seed(self.seed + 1)).images
            return frechet(self.classifier.features(images).numpy(), self.data_features)
