"""Adaptive precision for diffusion sampling: schedules assign a weight precision per step,
and the evaluation measures what each schedule costs in quality, bytes and time."""
import importlib

# Imported on first use: `haagenti schedule` checks its arguments (adaptive.presets) before
# paying for torch and diffusers.
_WHERE = {
    "AdaptiveError": "presets", "ProfilePreset": "presets",
    "Precision": "precision", "PrecisionCapabilities": "precision",
    "PrecisionProfile": "profile", "PrecisionZone": "profile", "ZoneAxis": "profile",
    "PrecisionSchedule": "schedule", "PrecisionTransition": "schedule", "ScheduleConfig": "schedule", "StepPrecision": "schedule",
    "TransitionKind": "schedule", "TransitionPlanner": "schedule", "TransitionStrategy": "schedule", "quick_schedule": "schedule",
    "searched_schedule": "schedule", "preset_profile": "search",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
