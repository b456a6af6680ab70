"""A precision schedule applied to a diffusers pipeline's denoiser.

A forward pre-hook on the denoiser reads the timestep each call receives, finds which of the
scheduler's noise levels it is, and installs that step's precision's layers before the call runs;
a forward hook mixes in the previous precision's output on blending (gradual) steps. Keying on
the timestep rather than counting calls keeps samplers that call the model twice per step
(Heun) on the right entry. Each precision's layers are built once and cached, all resident;
residency.StreamingSwitcher keeps only what the next step needs, read from the library."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from haagenti.adaptive.precision import AdaptiveError, Precision, PrecisionCapabilities
from haagenti.adaptive.profile import PrecisionProfile
from haagenti.adaptive.quantize import PrecisionLayers, held_bytes
from haagenti.adaptive.schedule import PrecisionSchedule, ScheduleConfig, StepPrecision, TransitionPlanner, TransitionStrategy


def _distinct(values) -> list[float]:
    return list(dict.fromkeys(float(v) for v in values))


def noise_levels(scheduler, steps: int) -> tuple[list[float], list[float]]:
    """The scheduler's distinct timesteps for `steps` steps, in sampling order, and the noise level
    sigma = sqrt((1 - a_bar) / a_bar) at each (read from its alphas_cumprod, or its own sigmas
    for schedulers without one, e.g. flow matching). One schedule entry per distinct level."""
    scheduler.set_timesteps(steps)
    ts = _distinct(scheduler.timesteps)
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is not None:
        a = np.interp(ts, np.arange(len(ac)), ac.double().numpy())
        return ts, [float(x) for x in np.sqrt((1 - a) / a)]
    return ts, _distinct(scheduler.sigmas)[: len(ts)]


def plan_for(scheduler, steps: int, profile: PrecisionProfile, transition: TransitionStrategy | None = None,
             capabilities: PrecisionCapabilities | None = None) -> PrecisionSchedule:
    """Plan `profile` on this scheduler's own noise levels (zones on sigma or log-SNR map to the
    same physics whatever the scheduler class or step count)."""
    ts, sig = noise_levels(scheduler, steps)
    cfg = ScheduleConfig(len(ts), profile, capabilities or PrecisionCapabilities.detect(), transition or TransitionStrategy.immediate(), sigmas=tuple(sig))
    return TransitionPlanner().plan(cfg)


@dataclass(frozen=True)
class DenoiserCall:
    step: int
    timestep: float
    precision: Precision
    previous: Precision | None
    blend: float
    weight_bytes: int  # weights the call touched (both precisions on a blending step)


class PrecisionSwitcher:
    """`with PrecisionSwitcher(pipe.unet, pipe.scheduler, schedule): pipe(...)` runs each step at
    the schedule's precision and restores the FP32 layers afterwards; `calls` records each call."""

    def __init__(self, denoiser: nn.Module, scheduler, schedule: PrecisionSchedule):
        self.denoiser, self.scheduler, self.schedule = denoiser, scheduler, schedule
        self.cache: dict[Precision, PrecisionLayers] = {Precision.FP32: PrecisionLayers(denoiser, Precision.FP32)}
        self.calls: list[DenoiserCall] = []
        self._handles: list = []
        self._step: StepPrecision | None = None

    def layers(self, p: Precision) -> PrecisionLayers:
        if p not in self.cache:  # built from the FP32 layers (only outside a run: __enter__ builds all)
            self.cache[Precision.FP32].install(self.denoiser)
            self.cache[p] = PrecisionLayers(self.denoiser, p)
        return self.cache[p]

    def weight_bytes_at(self, p: Precision) -> int:
        """Bytes `p`'s weights occupy (scales included)."""
        return self.layers(p).weight_bytes

    def resident_bytes(self) -> int:
        """Bytes the denoiser and every precision's cached layers hold now."""
        return held_bytes(self.denoiser, *(m for layers in self.cache.values() for m in layers.layers.values()))

    def _open(self) -> None:
        """Make every precision the schedule needs available (here: build them all)."""
        for s in self.schedule.steps:
            self.layers(s.precision)
            if s.previous is not None:
                self.layers(s.previous)

    def _close(self) -> None:
        self.cache[Precision.FP32].install(self.denoiser)

    def _begin(self, step: int, module: nn.Module) -> None:
        """A call of `step` is about to run at its precision (`_after` runs a blend's other half)."""
        self._run_at(self.schedule.steps[step].precision, module)

    def _run_at(self, p: Precision, module: nn.Module) -> None:
        self.layers(p).install(module)

    def __enter__(self) -> "PrecisionSwitcher":
        self._open()
        self.calls = []
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._before, with_kwargs=True),
            self.denoiser.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._close()

    def step_of(self, timestep) -> int:
        levels = _distinct(self.scheduler.timesteps)
        if len(levels) != len(self.schedule):
            raise AdaptiveError(f"the schedule has {len(self.schedule)} steps but the scheduler runs {len(levels)} noise levels")
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        return min(range(len(levels)), key=lambda i: abs(levels[i] - t))

    def _before(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        i = self.step_of(t)
        sp = self.schedule.steps[i]
        self._begin(i, module)
        blending = sp.previous is not None and sp.blend < 1
        nbytes = self.weight_bytes_at(sp.precision) + (self.weight_bytes_at(sp.previous) if blending else 0)
        self.calls.append(DenoiserCall(i, float(torch.as_tensor(t).reshape(-1)[0]), sp.precision, sp.previous if blending else None, sp.blend, nbytes))
        self._step = sp
        return None

    def _after(self, module, args, kwargs, output):
        sp = self._step
        if sp is None or sp.previous is None or sp.blend >= 1:
            return None
        self._run_at(sp.previous, module)
        other = module.forward(*args, **kwargs)  # forward, not __call__: no re-entry into the hooks
        self._run_at(sp.precision, module)
        mix = lambda a, b: sp.blend * a + (1 - sp.blend) * b  # noqa: E731
        if isinstance(output, tuple):
            return (mix(output[0], other[0]),) + tuple(output[1:])
        output.sample = mix(output.sample, other.sample)
        return output

    def weight_bytes(self) -> int:
        """Weight bytes touched over the run."""
        return sum(c.weight_bytes for c in self.calls)
