"""Residency that follows the schedule: a switcher streaming precision tiers from the library
holds only what the running and next step need, reads the next step's ahead of it on another
thread, and samples exactly as the same tiers held all at once."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from haagenti.adaptive.models import digits, train, unet
from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.quantize import layer_paths, quantize
from haagenti.adaptive.residency import WORKER, StreamingSwitcher
from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler
from haagenti.adaptive.schedule import PrecisionSchedule, StepPrecision
from haagenti.adaptive.switch import PrecisionSwitcher
from haagenti.adaptive.tiers import LayerTiers, add_tier, load_model
from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary

I4, I6, I8, H, F32 = Precision.INT4, Precision.INT6, Precision.INT8, Precision.FP16, Precision.FP32


@pytest.fixture(scope="module")
def tiny():
    """An 8x8 UNet trained for seconds (one thread: the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield train(unet(8, (8, 16)), digits(8), 40, batch=32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def library(tiny, tmp_path_factory):
    """The UNet in a library with its INT8, INT6 and INT4 tiers; "bare" is the same model without tiers."""
    folder = tmp_path_factory.mktemp("residency")
    path = str(folder / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    lib = FragmentLibrary.open(str(folder / "lib"), LibraryConfig(fragment_size=64 * 1024))
    lib.ingest([path], "unet", "digits")
    lib.ingest([path], "bare", "digits")
    for p in ("int8", "int6", "int4"):
        add_tier(lib, "unet", p)
    return lib


def _pipe(model, sampler="ddim"):
    pipe = DigitsPipeline(model, make_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _schedule(*precisions, blend_at=None):
    steps = [StepPrecision(i, p) for i, p in enumerate(precisions)]
    if blend_at is not None:
        steps[blend_at] = StepPrecision(blend_at, precisions[blend_at], precisions[blend_at - 1], 0.5)
    return PrecisionSchedule(steps, [])


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_streaming_drops_the_tiers_no_later_step_needs(tiny, library):
    """INT8 for 3 steps then INT4 for 3: after step 2 every layer holds INT4 only, requested
    during step 2 on the worker thread; the peak is the INT8 tier, not INT8 and INT4 together."""
    pipe = _pipe(tiny)
    sw = StreamingSwitcher(tiny, pipe.scheduler, _schedule(I8, I8, I8, I4, I4, I4), LayerTiers(library, "unet"))
    layers = len(layer_paths(tiny))
    own = [tiny.get_submodule(k).weight for k in layer_paths(tiny)]
    seen = []
    keep = lambda pipe, i, t, kw: seen.append((sw.resident(), sw.held_bytes))  # noqa: E731
    with sw:
        fixed = sw.resident_bytes() - sw.held_bytes
        assert sw.resident() == {I8: layers} and sw.held_bytes == sw.weight_bytes_at(I8)
        assert all(w.numel() == 0 for w in own)  # the denoiser's FP32 weights are released while streaming
        pipe(4, 6, torch.Generator().manual_seed(1), callback_on_step_end=keep)
    int8, int4 = sw.weight_bytes_at(I8), sw.weight_bytes_at(I4)
    assert int4 < int8 < sw.weight_bytes_at(H)
    assert seen[:3] == [({I8: layers}, int8), ({I8: layers}, int8), ({I4: layers}, int4)]
    assert seen[5] == ({I8: layers}, int8)  # after the last step: step 0's tier again, for the next call
    assert sw.peak_bytes == fixed + int8  # layer by layer: never both tiers of a layer at once
    ahead = [ld for ld in sw.loads if ld.precision is I4]
    assert sum(len(ld.layers) for ld in ahead) == layers
    assert all(ld.requested_in == 2 and ld.thread.startswith(WORKER) for ld in ahead)

    everything = StreamingSwitcher(tiny, pipe.scheduler, sw.schedule, LayerTiers(library, "unet"), keep_all=True)
    with everything:
        pipe(4, 6, torch.Generator().manual_seed(1))
    assert everything.peak_bytes == fixed + int8 + int4 and everything.resident() == {}


@pytest.mark.parametrize("sampler", ["ddim", "heun", "euler_a"])
def test_streamed_samples_equal_all_resident_ones_and_the_model_comes_back(tiny, library, sampler):
    """The same tiers streamed or all held give the same samples bit for bit (the same weights,
    the same arithmetic); on FP32/FP16 steps also the same as the quanto switcher's (INT8/INT4
    differ: its quantiser is quanto's, the library's tiers are stored by tiers.quantize). After
    the run the denoiser's Parameters are the same objects with the same values."""
    pipe = _pipe(tiny, sampler)
    before = _weights(tiny)
    params = {k: id(v) for k, v in tiny.named_parameters()}
    tiers = LayerTiers(library, "unet")
    mixed = _schedule(I8, I8, I4, I4, H, I4, blend_at=2)
    out = {}
    for name, sw in (("streamed", StreamingSwitcher(tiny, pipe.scheduler, mixed, tiers)),
                     ("resident", StreamingSwitcher(tiny, pipe.scheduler, mixed, tiers, keep_all=True))):
        with sw:
            out[name] = [pipe(4, 6, torch.Generator().manual_seed(s)).images for s in (1, 2)]  # two calls in one context
    assert all(torch.equal(a, b) for a, b in zip(out["streamed"], out["resident"]))
    exact = _schedule(H, H, F32, F32, H, H)
    with StreamingSwitcher(tiny, pipe.scheduler, exact, tiers):
        streamed = pipe(4, 6, torch.Generator().manual_seed(1)).images
    with PrecisionSwitcher(tiny, pipe.scheduler, exact):
        assert torch.equal(streamed, pipe(4, 6, torch.Generator().manual_seed(1)).images)
    assert {k: id(v) for k, v in tiny.named_parameters()} == params
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_a_missing_tier_or_another_model_is_one_line_and_leaves_the_denoiser_alone(tiny, library):
    pipe = _pipe(tiny)
    before = _weights(tiny)
    with pytest.raises(AdaptiveError, match=r"model 'bare' has no int4 tier; add it first: `haagenti tier add LIBRARY bare int4`") as e:
        with StreamingSwitcher(tiny, pipe.scheduler, _schedule(H, I4), LayerTiers(library, "bare")):
            pass
    assert "\n" not in str(e.value)
    other = unet(8, (8, 16))
    with pytest.raises(AdaptiveError, match=r"the denoiser's '[^']+\.weight' differs from model 'unet' in the library"):
        with StreamingSwitcher(other, pipe.scheduler, _schedule(H, I8), LayerTiers(library, "unet")):
            pass
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())


def test_the_int6_tier_round_trips_and_sits_between_int8_and_int4(tiny, library):
    """The stored INT6 tier reads back as quantize wrote it (packed levels, scale, shift), costs
    fewer bytes than INT8 and more than INT4, and its error on the largest layer of the trained
    UNet lies between theirs; a schedule with INT6 steps streams as the all-resident switcher runs
    it (its INT6 layers are the same grid, held dequantised; quanto has none), bit for bit."""
    tiers = LayerTiers(library, "unet")
    name = max((f"{k}.weight" for k in layer_paths(tiny)), key=lambda n: tiny.get_parameter(n).numel())
    w = tiny.get_parameter(name).detach()
    read, written = tiers.load(I6, [name])[name], quantize(w, I6)
    assert all(torch.equal(a, b) for a, b in ((read.data, written.data), (read.scale, written.scale), (read.shift, written.shift)))
    assert torch.equal(load_model(library, "unet", "int6")[name], written.dequantize())
    assert read.data.numel() == w.numel() * 6 // 8
    err = {p: float((quantize(w, p).dequantize() - w).norm() / w.norm()) for p in (I8, I6, I4)}
    assert err[I8] < err[I6] < err[I4], err
    paths = [f"{k}.weight" for k in layer_paths(tiny)]
    assert tiers.weight_bytes(I4, paths) < tiers.weight_bytes(I6, paths) < tiers.weight_bytes(I8, paths)
    pipe = _pipe(tiny, "dpmpp2m")
    schedule = _schedule(I8, I6, I6, H)  # quanto's INT8 is the library's to the bit; its INT4 is not
    with StreamingSwitcher(tiny, pipe.scheduler, schedule, tiers):
        streamed = pipe(4, 4, torch.Generator().manual_seed(1)).images
    with PrecisionSwitcher(tiny, pipe.scheduler, schedule) as resident:
        assert torch.equal(streamed, pipe(4, 4, torch.Generator().manual_seed(1)).images)
    assert resident.weight_bytes_at(I6) == tiers.weight_bytes(I6, paths)
