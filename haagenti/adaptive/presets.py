"""The names `haagenti schedule` checks before it imports torch and diffusers (seconds): the
presets, the samplers, and the error both raise. Nothing here imports torch."""
from __future__ import annotations

from enum import Enum

SAMPLER_NAMES = ("ddim", "dpmpp2m", "euler_a", "heun")  # haagenti.adaptive.sampling.SAMPLERS, in this order


class AdaptiveError(ValueError):
    """An invalid step, profile, schedule or constraint."""


def check_sampler(name: str) -> str:
    if name not in SAMPLER_NAMES:
        raise AdaptiveError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_NAMES)}")
    return name


class ProfilePreset(str, Enum):
    """Named budget points: each preset is the searched schedule (search.preset_profile) at its
    share of all-FP16 weight bytes, on the measured sensitivity of a sampler (default DDIM on the digits
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

    @classmethod
    def parse(cls, text: str) -> "ProfilePreset":
        key = text.strip().lower().replace("-", "_").replace("lowvram", "low_vram").replace("noiseadaptive", "noise_adaptive")
        try:
            return cls(key)
        except ValueError:
            raise AdaptiveError(f"unknown preset {text!r}; use one of {', '.join(p.value for p in cls)}") from None
