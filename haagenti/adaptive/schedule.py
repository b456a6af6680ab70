"""Per-step precision schedules, transitions between precisions, and the planner that turns a
profile into a schedule under hardware, memory and switching constraints."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from haagenti.adaptive.precision import AdaptiveError, Precision, PrecisionCapabilities
from haagenti.adaptive.profile import PrecisionProfile, ProfilePreset, ZoneAxis
from haagenti.adaptive.search import SearchResult, preset_profile


class TransitionKind(str, Enum):
    IMMEDIATE = "immediate"
    GRADUAL = "gradual"
    STEP_AWARE = "step_aware"


@dataclass(frozen=True)
class TransitionStrategy:
    """IMMEDIATE switches at the step; GRADUAL(n) blends the two precisions' outputs over n
    steps; STEP_AWARE blends over a window scaled to the schedule (10% of steps, at least 1)."""

    kind: TransitionKind = TransitionKind.IMMEDIATE
    steps: int = 0

    @classmethod
    def immediate(cls) -> "TransitionStrategy":
        return cls(TransitionKind.IMMEDIATE)

    @classmethod
    def gradual(cls, n: int) -> "TransitionStrategy":
        if n < 1:
            raise AdaptiveError("a gradual transition needs at least 1 step")
        return cls(TransitionKind.GRADUAL, n)

    @classmethod
    def step_aware(cls) -> "TransitionStrategy":
        return cls(TransitionKind.STEP_AWARE)

    def window(self, total_steps: int) -> int:
        if self.kind is TransitionKind.IMMEDIATE:
            return 0
        if self.kind is TransitionKind.GRADUAL:
            return self.steps
        return max(1, round(0.1 * total_steps))


@dataclass(frozen=True)
class PrecisionTransition:
    step: int  # first step run (partly) at the new precision
    source: Precision
    target: Precision
    window: int

    def blend(self, step: int) -> float:
        """Weight of the target precision's output at `step` (1 once the window is over)."""
        if step < self.step:
            return 0.0
        if self.window == 0:
            return 1.0
        return min(1.0, (step - self.step + 1) / (self.window + 1))


@dataclass(frozen=True)
class StepPrecision:
    step: int
    precision: Precision
    previous: Precision | None = None  # blended in during a gradual transition
    blend: float = 1.0  # weight of `precision`


@dataclass(frozen=True)
class ScheduleConfig:
    steps: int
    profile: PrecisionProfile = field(default_factory=lambda: preset_profile(ProfilePreset.BALANCED))
    capabilities: PrecisionCapabilities = field(default_factory=PrecisionCapabilities.cpu)
    transition: TransitionStrategy = field(default_factory=TransitionStrategy.immediate)
    min_gap: int = 1  # minimum steps between two switches
    sigmas: tuple[float, ...] | None = None  # the sampler's noise level per step, for noise axes

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise AdaptiveError(f"a schedule needs at least one step, not {self.steps}")
        if self.min_gap < 1:
            raise AdaptiveError("min_gap must be at least 1")
        if self.profile.axis is not ZoneAxis.FRACTION:
            if self.sigmas is None or len(self.sigmas) < self.steps:
                raise AdaptiveError(f"profile {self.profile.name!r} is defined on noise level: pass the sampler's sigmas for all {self.steps} steps")
            if any(s < 0 or math.isnan(s) for s in self.sigmas[: self.steps]):
                raise AdaptiveError("sigmas must be non-negative numbers")


@dataclass
class PrecisionSchedule:
    steps: list[StepPrecision]
    transitions: list[PrecisionTransition]
    name: str = "custom"

    def __len__(self) -> int:
        return len(self.steps)

    def precision_at(self, step: int) -> Precision:
        if not 0 <= step < len(self.steps):
            raise AdaptiveError(f"step {step} is outside the schedule (0..{len(self.steps) - 1})")
        return self.steps[step].precision

    def next_transition(self, step: int) -> PrecisionTransition | None:
        return next((t for t in self.transitions if t.step > step), None)

    def steps_at_precision(self, p: Precision) -> list[int]:
        return [s.step for s in self.steps if s.precision is p]

    def precision_distribution(self) -> dict[Precision, float]:
        c = Counter(s.precision for s in self.steps)
        return {p: c[p] / len(self.steps) for p in Precision if c[p]}

    def average_bits(self) -> float:
        return sum(s.precision.bits for s in self.steps) / len(self.steps)

    def weight_bytes_ratio(self, reference: Precision = Precision.FP16) -> float:
        """Weight bytes touched over the generation relative to running every step at `reference`
        (a blended step touches both precisions' weights)."""
        touched = sum(s.precision.bits + (s.previous.bits if s.previous and s.blend < 1 else 0) for s in self.steps)
        return touched / (reference.bits * len(self.steps))

    def timeline(self) -> str:
        glyph = {Precision.INT4: "4", Precision.INT5: "5", Precision.INT6: "6", Precision.INT8: "8", Precision.FP16: "h", Precision.BF16: "b", Precision.FP32: "F"}
        bar = "".join(glyph[s.precision] if s.blend >= 1 else "~" for s in self.steps)
        lines = [f"{self.name}: {len(self.steps)} steps  [{bar}]", "  4=INT4 5=INT5 6=INT6 8=INT8 h=FP16 b=BF16 F=FP32 ~=blending"]
        for p, share in self.precision_distribution().items():
            lines.append(f"  {p.value:5s} {share:6.1%}  steps {_ranges(self.steps_at_precision(p))}")
        lines.append(f"  average {self.average_bits():.1f} bits: {self.weight_bytes_ratio():.0%} of all-FP16 weight bits (quantisation scales not counted)")
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


class TransitionPlanner:
    """Profile -> schedule: map each step to its zone, clamp to the hardware, enforce the
    minimum gap between switches and an optional memory budget, then lay out transitions."""

    def __init__(self, memory_budget_bits: float | None = None):
        self.memory_budget_bits = memory_budget_bits  # max average bits per step, None = unbounded

    def plan(self, config: ScheduleConfig) -> PrecisionSchedule:
        raw = [config.capabilities.clamp(config.profile.precision_for(self._coordinate(config, i))) for i in range(config.steps)]
        raw = self._enforce_gap(raw, config.min_gap)
        if self.memory_budget_bits is not None:
            raw = self._fit_budget(raw, config.capabilities)
        window = config.transition.window(config.steps)
        transitions, steps = [], []
        for i, p in enumerate(raw):
            if i and p is not raw[i - 1]:
                transitions.append(PrecisionTransition(i, raw[i - 1], p, window))
            t = transitions[-1] if transitions else None
            blend = t.blend(i) if t else 1.0
            steps.append(StepPrecision(i, p, t.source if t and blend < 1 else None, blend))
        return PrecisionSchedule(steps, transitions, config.profile.name)

    @staticmethod
    def _coordinate(config: ScheduleConfig, i: int) -> float:
        if config.profile.axis is ZoneAxis.FRACTION:
            return i / config.steps
        sigma = config.sigmas[i]  # type: ignore[index]
        if config.profile.axis is ZoneAxis.SIGMA:
            return sigma
        return -2 * math.log(sigma) if sigma > 0 else float("inf")

    @staticmethod
    def _enforce_gap(raw: list[Precision], gap: int) -> list[Precision]:
        out = list(raw)
        last_switch = 0
        for i in range(1, len(out)):
            if out[i] is not out[i - 1]:
                if i - last_switch < gap and last_switch > 0:
                    out[i] = out[i - 1]  # too soon: hold the current precision
                else:
                    last_switch = i
        return out

    def _fit_budget(self, raw: list[Precision], caps: PrecisionCapabilities) -> list[Precision]:
        from haagenti.adaptive.precision import ORDER

        out = list(raw)
        budget = self.memory_budget_bits or 0
        while sum(p.bits for p in out) / len(out) > budget:
            # Lower the widest step nearest the end (the measured least-sensitive region).
            i = max(range(len(out)), key=lambda k: (out[k].bits, k))
            lower = [q for q in ORDER[: ORDER.index(out[i])] if caps.supports(q)]
            if not lower:
                raise AdaptiveError(f"cannot fit an average of {budget} bits on {caps.device}")
            out[i] = lower[-1]
        return out


def quick_schedule(preset: str | ProfilePreset, steps: int, transition: TransitionStrategy | None = None, sigmas: list[float] | None = None,
                   sampler: str = "ddim") -> PrecisionSchedule:
    p = preset if isinstance(preset, ProfilePreset) else ProfilePreset.parse(preset)
    config = ScheduleConfig(steps, preset_profile(p, sampler), PrecisionCapabilities.detect(), transition or TransitionStrategy.immediate(), sigmas=tuple(sigmas) if sigmas else None)
    return TransitionPlanner().plan(config)


def searched_schedule(found: SearchResult, name: str, steps: int | None = None, transition: TransitionStrategy | None = None) -> PrecisionSchedule:
    """A searched choice planned as a schedule of `steps` (the measured step count by default)."""
    cfg = ScheduleConfig(steps or found.sensitivity.steps, found.profile(name), transition=transition or TransitionStrategy.immediate())
    return TransitionPlanner().plan(cfg)
