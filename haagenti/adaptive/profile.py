"""Precision profiles: zones over the denoising trajectory, on step fraction or on noise level.

A zone on noise level (sigma, or log-SNR) gives the same physical schedule whatever the number
of steps or the sampler's noise schedule: the precision follows how noisy the latent is.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from haagenti.adaptive.precision import AdaptiveError, Precision


class ZoneAxis(str, Enum):
    FRACTION = "fraction"  # 0 = first step, 1 = end of sampling
    SIGMA = "sigma"  # noise std relative to signal (diffusers' sigmas); high = noisy
    LOGSNR = "logsnr"  # log(1/sigma^2); low = noisy


@dataclass(frozen=True)
class PrecisionZone:
    start: float
    end: float
    precision: Precision

    def contains(self, x: float) -> bool:
        return self.start <= x < self.end


@dataclass(frozen=True)
class PrecisionProfile:
    """Zones covering the axis without gaps or overlaps. For FRACTION they cover [0, 1]; for
    noise axes they cover (-inf, inf) in the axis's own units."""

    name: str
    zones: tuple[PrecisionZone, ...]
    axis: ZoneAxis = ZoneAxis.FRACTION

    def __post_init__(self) -> None:
        if not self.zones:
            raise AdaptiveError(f"profile {self.name!r} has no zones")
        zs = sorted(self.zones, key=lambda z: z.start)
        lo, hi = (0.0, 1.0) if self.axis is ZoneAxis.FRACTION else (float("-inf"), float("inf"))
        if zs[0].start > lo:
            raise AdaptiveError(f"profile {self.name!r}: nothing covers [{lo}, {zs[0].start})")
        for a, b in zip(zs, zs[1:]):
            if a.end < b.start:
                raise AdaptiveError(f"profile {self.name!r}: gap between {a.end} and {b.start}")
            if a.end > b.start:
                raise AdaptiveError(f"profile {self.name!r}: zones overlap at {b.start}")
        if zs[-1].end < hi:
            raise AdaptiveError(f"profile {self.name!r}: nothing covers [{zs[-1].end}, {hi}]")
        for z in zs:
            if z.end <= z.start:
                raise AdaptiveError(f"profile {self.name!r}: empty zone [{z.start}, {z.end})")
        object.__setattr__(self, "zones", tuple(zs))

    def precision_for(self, x: float) -> Precision:
        if self.axis is ZoneAxis.FRACTION and x >= 1.0:
            return self.zones[-1].precision
        for z in self.zones:
            if z.contains(x):
                return z.precision
        raise AdaptiveError(f"profile {self.name!r} does not cover {x}")

    @classmethod
    def by_fraction(cls, name: str, *zones: tuple[float, float, Precision | str]) -> "PrecisionProfile":
        return cls(name, tuple(PrecisionZone(a, b, p if isinstance(p, Precision) else Precision.parse(p)) for a, b, p in zones))

    @classmethod
    def by_sigma(cls, name: str, *zones: tuple[float, float, Precision | str]) -> "PrecisionProfile":
        return cls(name, tuple(PrecisionZone(a, b, p if isinstance(p, Precision) else Precision.parse(p)) for a, b, p in zones), ZoneAxis.SIGMA)


INF = float("inf")


class ProfilePreset(str, Enum):
    """Named budget points: each preset is the searched schedule (search.py) at its share of
    all-FP16 weight bytes, on the measured sensitivity of a sampler (default DDIM on the digits
    UNet; docs/adaptive.md). `haagenti schedule evaluate` re-measures them. NOISE_ADAPTIVE stays a
    profile on the noise axis (precision by sigma), for any scheduler."""

    PERFORMANCE = "performance"
    BALANCED = "balanced"
    QUALITY = "quality"
    LOW_VRAM = "low_vram"
    CONSERVATIVE = "conservative"
    NOISE_ADAPTIVE = "noise_adaptive"

    @property
    def budget(self) -> float | None:
        """Weight bytes touched over a generation / all-FP16."""
        return {"performance": 0.35, "balanced": 0.4, "quality": 0.6, "low_vram": 0.32, "conservative": 1.0}.get(self.value)

    def profile(self, sampler: str = "ddim", model: str = "unet", sensitivity=None) -> PrecisionProfile:
        if self is ProfilePreset.NOISE_ADAPTIVE:
            # sigma = sqrt((1 - a_bar) / a_bar): above 20 the latent is almost pure noise.
            P = Precision
            return PrecisionProfile.by_sigma("noise_adaptive", (-INF, 1.0, P.INT4), (1.0, 20.0, P.INT8), (20.0, INF, P.FP16))
        from haagenti.adaptive.search import measured, search

        table = measured(sensitivity)
        if (model, sampler) not in table:
            raise AdaptiveError(f"no measured sensitivity for {model}/{sampler}; have {', '.join(f'{m}/{s}' for m, s in sorted(table))}")
        return search(table[model, sampler], self.budget).profile(self.value)

    @classmethod
    def parse(cls, text: str) -> "ProfilePreset":
        key = text.strip().lower().replace("-", "_").replace("lowvram", "low_vram").replace("noiseadaptive", "noise_adaptive")
        try:
            return cls(key)
        except ValueError:
            raise AdaptiveError(f"unknown preset {text!r}; use one of {', '.join(p.value for p in cls)}") from None
