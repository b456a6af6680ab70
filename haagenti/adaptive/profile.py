"""Precision profiles: zones over the denoising trajectory, on step fraction or on noise level.

A zone on noise level (sigma, or log-SNR) gives the same physical schedule whatever the number
of steps or the sampler's noise schedule: the precision follows how noisy the latent is.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.presets import ProfilePreset  # noqa: F401  (re-exported)


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
