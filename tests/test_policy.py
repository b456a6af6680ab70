"""Schedules as the `diffusion_step_policy` a checkpoint publishes in its denoiser's config
(the shape of diffusers PR #14664), and pipelines that follow the policy they carry."""
from __future__ import annotations

import copy

import pytest
import torch


from haagenti.adaptive.models import unet
from haagenti.adaptive.policy import PolicyPipeline, from_policy, policy_of, publish, to_policy
from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler

# What the published Cosmos3 FP8 checkpoints declare (and vLLM-Omni, SGLang and TensorRT-LLM read).
PUBLISHED = {
    "schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration", "scope": ["transformer"],
    "default_mode": "native", "first_steps": {"count": 3, "mode": "a16"}, "last_steps": {"count": 3, "mode": "a16"},
    "overlap": "a16", "reasoner": "a16",
}
H, Q = Precision.FP16, Precision.INT8


def test_the_published_policy_is_first_and_last_three_steps_at_16_bits_and_round_trips():
    s = from_policy(PUBLISHED, 10)
    assert [x.precision for x in s.steps] == [H, H, H, Q, Q, Q, Q, H, H, H]
    assert [(t.step, t.source, t.target) for t in s.transitions] == [(3, H, Q), (7, Q, H)]
    assert to_policy(s) == PUBLISHED
    assert [x.precision for x in from_policy(PUBLISHED, 4).steps] == [H] * 4  # windows overlap: the overlap mode
    assert [x.precision for x in from_policy(PUBLISHED, 20, Precision.INT4, Precision.BF16).steps].count(Precision.INT4) == 14


@pytest.mark.parametrize("precisions, refusal", [
    ([H, Q, Precision.INT4, Q, H], "not int4"),
    ([Q, H, Q, H, Q], "in between"),
])
def test_schedules_the_policy_cannot_hold_are_refused_in_one_line(precisions, refusal):
    from haagenti.adaptive.schedule import PrecisionSchedule, StepPrecision

    with pytest.raises(AdaptiveError, match=refusal):
        to_policy(PrecisionSchedule([StepPrecision(i, p) for i, p in enumerate(precisions)], []))
    blended = PrecisionSchedule([StepPrecision(0, H), StepPrecision(1, Q, H, 0.5)], [])
    with pytest.raises(AdaptiveError, match="gradual"):
        to_policy(blended)


@pytest.mark.parametrize("change", [
    {"schema_version": 2}, {"type": "windows"}, {"index_space": "sigma"}, {"default_mode": "w4a4"},
    {"first_steps": {"count": -1, "mode": "a16"}}, {"last_steps": {"count": 2.5, "mode": "a16"}},
    {"last_steps": {"count": 2}}, {"overlap": None},
])
def test_policies_it_does_not_fully_understand_are_refused(change):
    with pytest.raises(AdaptiveError, match="diffusion_step_policy"):
        from_policy({**PUBLISHED, **change}, 10)
    with pytest.raises(AdaptiveError, match="diffusion_step_policy"):
        from_policy({k: v for k, v in PUBLISHED.items() if k not in change}, 10)


@pytest.fixture
def denoiser():
    torch.manual_seed(0)
    return unet(8, (8, 16))


def _pipe(model):
    pipe = DigitsPipeline(model, make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_pipeline_whose_config_carries_a_policy_runs_it_with_no_other_code(tmp_path, denoiser):
    """The policy written into the denoiser's config is saved with it (config.json), and a
    pipeline over the model built from that config runs each step at the policy's precision,
    then is its FP32 self again."""
    from safetensors.torch import load_file

    publish(denoiser, from_policy({**PUBLISHED, "first_steps": {"count": 2, "mode": "a16"}, "last_steps": {"count": 1, "mode": "a16"}}, 6))
    denoiser.save_pretrained(tmp_path / "unet")
    loaded = type(denoiser).from_config(type(denoiser).load_config(tmp_path / "unet"))
    loaded.load_state_dict(load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert policy_of(loaded)["first_steps"]["count"] == 2 and policy_of(loaded)["last_steps"]["count"] == 1
    plain = _pipe(copy.deepcopy(loaded))(2, 6, torch.Generator().manual_seed(1)).images
    pipe = PolicyPipeline(_pipe(loaded))
    images = pipe(2, num_inference_steps=6, generator=torch.Generator().manual_seed(1)).images
    assert [c.precision for c in pipe.switcher.calls] == [H, H, Q, Q, Q, H]
    assert not torch.equal(images, plain)  # INT8 steps ran
    assert torch.equal(pipe.pipe(2, 6, torch.Generator().manual_seed(1)).images, plain)  # FP32 layers back afterwards


def test_a_pipeline_without_a_policy_runs_as_it_is(denoiser):
    pipe = PolicyPipeline(_pipe(denoiser))
    assert pipe.policy is None
    a = pipe(2, num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images
    assert pipe.switcher is None and torch.equal(a, pipe.pipe(2, 4, torch.Generator().manual_seed(1)).images)


def test_a_policy_pipeline_streams_its_tiers_from_the_library(tmp_path, denoiser):
    """With the denoiser's model in a library, the policy runs with its layers streamed: only
    the a16 weights on the first steps, only the INT8 tier in the middle, the same samples as
    those tiers held all at once, and the FP32 model back afterwards."""
    from safetensors.torch import save_file

    from haagenti.adaptive.residency import StreamingSwitcher
    from haagenti.adaptive.tiers import LayerTiers, add_tier
    from haagenti.config import LibraryConfig
    from haagenti.library import FragmentLibrary

    path = str(tmp_path / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in denoiser.state_dict().items()}, path)
    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024))
    lib.ingest([path], "unet", "digits")
    add_tier(lib, "unet", "int8")
    policy = {**PUBLISHED, "first_steps": {"count": 2, "mode": "a16"}, "last_steps": {"count": 1, "mode": "a16"}}
    publish(denoiser, from_policy(policy, 6))
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    pipe = PolicyPipeline(_pipe(denoiser), tiers=LayerTiers(lib, "unet"))
    held = []
    images = pipe(2, num_inference_steps=6, generator=torch.Generator().manual_seed(1),
                  callback_on_step_end=lambda p, i, t, kw: held.append(set(pipe.switcher.resident()))).images
    assert isinstance(pipe.switcher, StreamingSwitcher) and [c.precision for c in pipe.switcher.calls] == [H, H, Q, Q, Q, H]
    assert held == [{H}, {Q}, {Q}, {Q}, {H}, {H}]  # what the next step needs, nothing else
    with StreamingSwitcher(denoiser, pipe.pipe.scheduler, from_policy(policy, 6), LayerTiers(lib, "unet"), keep_all=True):
        assert torch.equal(images, pipe.pipe(2, 6, torch.Generator().manual_seed(1)).images)
    assert all(torch.equal(v, before[k]) for k, v in denoiser.state_dict().items())
