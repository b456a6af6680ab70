"""Precision schedules as the step policy a checkpoint publishes in its denoiser's config,
`quantization_config.runtime.diffusion_step_policy`: the shape diffusers reads for Cosmos3's
mixed W8A8/W8A16 denoising (PR #14664), shared with vLLM-Omni and TensorRT-LLM.

The published policy gives each denoising-loop iteration one of two modes: "native", the
checkpoint's own quantized path, and "a16", a 16-bit path. Here "native" is the precision the
weights are quantized to (`native`, INT8 unless told) and "a16" is `high` (FP16 unless told).
The shape holds a first window, a last window and a default between them (`first_last_n`). It
cannot hold a third precision (INT4 in the middle with INT8 and FP16 edges), a window away from
the edges, a gradual blend, or zones on the noise level (its index is the loop iteration, so
a policy means other noise levels at another step count): `to_policy` refuses those in one
line, and `from_policy` refuses any policy it does not fully understand (fail closed, as the
published readers do).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.schedule import PrecisionSchedule, PrecisionTransition, StepPrecision
from haagenti.adaptive.residency import StreamingSwitcher
from haagenti.adaptive.switch import PrecisionSwitcher, noise_levels
from haagenti.adaptive.tiers import LayerTiers

KEYS = ("quantization_config", "runtime", "diffusion_step_policy")
SCHEMA = {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration"}
MODES = ("native", "a16")


def to_policy(schedule: PrecisionSchedule, native: Precision = Precision.INT8, high: Precision = Precision.FP16) -> dict[str, Any]:
    """The published policy of a schedule that runs `native` between a first and a last window
    of `high` (either window may be empty)."""
    if any(s.blend < 1 for s in schedule.steps):
        raise AdaptiveError("a step policy cannot express gradual transitions: plan the schedule with immediate ones")
    mode = {native: "native", high: "a16"}
    other = sorted({s.precision.value for s in schedule.steps if s.precision not in mode})
    if other:
        raise AdaptiveError(f"a step policy holds two precisions ({native.value} as native, {high.value} as a16), not {', '.join(other)}")
    modes = [mode[s.precision] for s in schedule.steps]
    first = next((i for i, m in enumerate(modes) if m == "native"), len(modes))
    last = next((i for i, m in enumerate(reversed(modes)) if m == "native"), 0)
    if "a16" in modes[first: len(modes) - last]:
        raise AdaptiveError(f"a step policy holds {high.value} windows at the first and last steps only: {schedule.name!r} has one in between")
    return {**SCHEMA, "scope": ["transformer"], "default_mode": "native", "first_steps": {"count": first, "mode": "a16"},
            "last_steps": {"count": last, "mode": "a16"}, "overlap": "a16", "reasoner": "a16"}


def from_policy(policy: Mapping[str, Any], steps: int, native: Precision = Precision.INT8, high: Precision = Precision.FP16) -> PrecisionSchedule:
    """The schedule a published policy asks for over `steps` denoising steps."""
    _check(policy)
    precision = {"native": native, "a16": high}
    first, last = policy["first_steps"], policy["last_steps"]
    chosen = []
    for i in range(steps):
        in_first, in_last = i < first["count"], i >= steps - last["count"]
        mode = policy["overlap"] if in_first and in_last else first["mode"] if in_first else last["mode"] if in_last else policy["default_mode"]
        chosen.append(precision[mode])
    transitions = [PrecisionTransition(i, chosen[i - 1], p, 0) for i, p in enumerate(chosen) if i and p is not chosen[i - 1]]
    return PrecisionSchedule([StepPrecision(i, p) for i, p in enumerate(chosen)], transitions,
                             f"policy: first {first['count']} / last {last['count']} steps {high.value}, else {native.value}")


def _check(policy: Any) -> None:
    if not isinstance(policy, Mapping):
        raise AdaptiveError("diffusion_step_policy must be an object")
    for k, v in SCHEMA.items():
        if policy.get(k) != v:
            raise AdaptiveError(f"diffusion_step_policy: {k} {policy.get(k)!r} is not supported (only {v!r})")
    for k in ("default_mode", "overlap"):
        if policy.get(k) not in MODES:
            raise AdaptiveError(f"diffusion_step_policy: {k} must be one of {', '.join(MODES)}, not {policy.get(k)!r}")
    for k in ("first_steps", "last_steps"):
        w = policy.get(k)
        if not isinstance(w, Mapping) or w.get("mode") not in MODES or type(w.get("count")) is not int or w["count"] < 0:
            raise AdaptiveError(f"diffusion_step_policy: {k} must be {{'count': a non-negative integer, 'mode': one of {', '.join(MODES)}}}, not {w!r}")


def policy_of(denoiser) -> Mapping[str, Any] | None:
    """The policy in a denoiser's config (diffusers keeps `quantization_config` there as a dict),
    or None when it carries none."""
    node: Any = getattr(denoiser, "config", None)
    for k in KEYS:
        node = node.get(k) if isinstance(node, Mapping) else getattr(node, k, None)
        if node is None:
            return None
    return node


def publish(denoiser, schedule: PrecisionSchedule, native: Precision = Precision.INT8, high: Precision = Precision.FP16) -> None:
    """Write `schedule` into the denoiser's config as a step policy (saved in its config.json).
    diffusers' `from_pretrained` refuses a `quantization_config` without a `quant_method`, so an
    unquantized model saved with a policy is rebuilt with `from_config(load_config(...))`."""
    policy = to_policy(schedule, native, high)
    quant = dict(_quantization_config(denoiser))
    quant["runtime"] = {**quant.get("runtime", {}), "diffusion_step_policy": policy}
    denoiser.register_to_config(quantization_config=quant)


def _quantization_config(denoiser) -> Mapping[str, Any]:
    quant = denoiser.config.get("quantization_config") or {}
    return quant if isinstance(quant, Mapping) else quant.to_dict()


class PolicyPipeline:
    """A diffusers pipeline run under the step policy its denoiser's config carries: each call
    plans the policy on that call's step count and runs it under a PrecisionSwitcher. With
    `tiers` (the denoiser's model in a library, with its `native` tier) the layers are streamed
    from the library, only what the running and next step need resident (StreamingSwitcher).
    A pipeline whose denoiser carries no policy runs as it is. `switcher` is the last call's."""

    def __init__(self, pipe, native: Precision = Precision.INT8, high: Precision = Precision.FP16, tiers: LayerTiers | None = None):
        self.pipe, self.native, self.high, self.tiers = pipe, native, high, tiers
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise AdaptiveError(f"{type(pipe).__name__} has no unet or transformer to run a step policy on")
        self.policy = policy_of(self.denoiser)
        if self.policy is not None:
            _check(self.policy)
        self.switcher: PrecisionSwitcher | None = None

    def __call__(self, *args, **kwargs):
        if self.policy is None:
            return self.pipe(*args, **kwargs)
        steps = kwargs.get("num_inference_steps", inspect.signature(self.pipe.__call__).parameters["num_inference_steps"].default)
        levels, _ = noise_levels(self.pipe.scheduler, steps)
        schedule = from_policy(self.policy, len(levels), self.native, self.high)
        if self.tiers is None:
            self.switcher = PrecisionSwitcher(self.denoiser, self.pipe.scheduler, schedule)
        else:
            self.switcher = StreamingSwitcher(self.denoiser, self.pipe.scheduler, schedule, self.tiers)
        with self.switcher:
            return self.pipe(*args, **kwargs)
