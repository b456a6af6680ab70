"""Adaptive precision for diffusion sampling: schedules assign a weight precision per step,
and the evaluation measures what each schedule costs in quality, bytes and time."""
from haagenti.adaptive.precision import AdaptiveError, Precision, PrecisionCapabilities
from haagenti.adaptive.profile import PrecisionProfile, PrecisionZone, ProfilePreset, ZoneAxis
from haagenti.adaptive.schedule import (
    PrecisionSchedule,
    PrecisionTransition,
    ScheduleConfig,
    StepPrecision,
    TransitionKind,
    TransitionPlanner,
    TransitionStrategy,
    quick_schedule,
)

__all__ = [
    "AdaptiveError", "Precision", "PrecisionCapabilities", "PrecisionProfile", "PrecisionZone", "ProfilePreset", "ZoneAxis",
    "PrecisionSchedule", "PrecisionTransition", "ScheduleConfig", "StepPrecision", "TransitionKind", "TransitionPlanner",
    "TransitionStrategy", "quick_schedule",
]
