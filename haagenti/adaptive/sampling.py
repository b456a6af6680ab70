"""A diffusers pipeline for the digits denoisers and the samplers the schedules are measured
under. The loop is the one diffusers' own pipelines run (init_noise_sigma, scale_model_input,
scheduler.step with the generator), so any scheduler class plugs in unchanged."""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from haagenti.extras import require

require("adaptive")
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from haagenti.adaptive.models import TRAIN_STEPS
from haagenti.adaptive.presets import SAMPLER_NAMES, check_sampler

SAMPLERS = dict(zip(SAMPLER_NAMES, (
    (DDIMScheduler, {}),  # eta 0: deterministic
    (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    (EulerAncestralDiscreteScheduler, {}),  # re-injects noise every step
    (HeunDiscreteScheduler, {}),  # two model calls per step
), strict=True))


def make_scheduler(sampler: str):
    """A fresh scheduler of the named kind on the training noise schedule."""
    cls, extra = SAMPLERS[check_sampler(sampler)]
    return cls.from_config(DDPMScheduler(num_train_timesteps=TRAIN_STEPS).config, **extra)


class DigitsPipeline(DiffusionPipeline):
    """Unconditional image sampling: `unet` is any denoiser called as unet(x, t).sample."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 16, num_inference_steps: int = 20, generator: torch.Generator | None = None, eta: float = 0.0,
                 callback_on_step_end: Callable | None = None) -> ImagePipelineOutput:
        cfg = self.unet.config
        x = randn_tensor((batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator, device=self.device)
        self.scheduler.set_timesteps(num_inference_steps)
        x = x * self.scheduler.init_noise_sigma
        accepts = inspect.signature(self.scheduler.step).parameters
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepts}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            eps = self.unet(self.scheduler.scale_model_input(x, t), t).sample
            x = self.scheduler.step(eps, t, x, **extra).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": x})
        return ImagePipelineOutput(images=x.clamp(-1, 1))
