import pytest
import torch

from haagenti.adaptive import (
    AdaptiveError,
    Precision,
    PrecisionCapabilities,
    PrecisionProfile,
    ProfilePreset,
    ScheduleConfig,
    TransitionPlanner,
    TransitionStrategy,
    preset_profile,
    quick_schedule,
    searched_schedule,
)
from haagenti.adaptive.evaluate import Evaluator, uniform, window_schedule
from haagenti.adaptive.models import digits, train, unet, unet5m
from haagenti.adaptive.quantize import PrecisionLayers, QuantizedTensor, quantize
from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler
from haagenti.adaptive.search import CHOICES, Sensitivity, frontier, measured, search
from haagenti.adaptive.switch import PrecisionSwitcher, noise_levels, plan_for
from tests.helpers import cli

SAMPLERS = ("ddim", "dpmpp2m", "euler_a", "heun")


def ddim_sigmas(steps):
    return noise_levels(make_scheduler("ddim"), steps)[1]


def test_precision_parsing_and_sizes():
    assert Precision.parse("INT8") is Precision.INT8 and Precision.parse("half") is Precision.FP16
    assert Precision.INT4.memory_ratio == 0.25 and Precision.FP32.bytes == 4
    with pytest.raises(AdaptiveError, match="unknown precision"):
        Precision.parse("int3")


def test_profiles_reject_gaps_overlaps_and_partial_cover():
    with pytest.raises(AdaptiveError, match="gap"):
        PrecisionProfile.by_fraction("g", (0, 0.4, "int8"), (0.5, 1, "fp16"))
    with pytest.raises(AdaptiveError, match="overlap"):
        PrecisionProfile.by_fraction("o", (0, 0.6, "int8"), (0.5, 1, "fp16"))
    with pytest.raises(AdaptiveError, match="covers"):
        PrecisionProfile.by_fraction("p", (0, 0.5, "int8"))
    with pytest.raises(AdaptiveError, match="sigmas"):
        ScheduleConfig(10, preset_profile(ProfilePreset.NOISE_ADAPTIVE))
    with pytest.raises(AdaptiveError, match="at least one step"):
        ScheduleConfig(0)


@pytest.mark.parametrize("preset", list(ProfilePreset))
def test_every_preset_plans_for_any_step_count(preset):
    for steps in (1, 7, 20, 50):
        s = quick_schedule(preset, steps, sigmas=ddim_sigmas(steps))
        assert len(s) == steps and abs(sum(s.precision_distribution().values()) - 1) < 1e-9
        with pytest.raises(AdaptiveError, match="outside"):
            s.precision_at(steps)


def test_presets_are_searched_budget_points():
    table = measured()
    assert {s for _, s in table} >= {"ddim", "dpmpp2m", "euler_a"} and {m for m, _ in table} == {"unet", "mlp"}
    for preset in ProfilePreset:
        if preset.budget is None:
            continue
        for sampler in ("ddim", "dpmpp2m", "euler_a"):
            found = search(table["unet", sampler], preset.budget)
            assert found.weight_bytes_vs_fp16 <= preset.budget
            planned = TransitionPlanner().plan(ScheduleConfig(20, preset_profile(preset, sampler)))
            assert [s.precision for s in planned.steps] == [s.precision for s in searched_schedule(found, "x", 20).steps]
    with pytest.raises(AdaptiveError, match="no measured sensitivity"):
        preset_profile(ProfilePreset.BALANCED, "heun")


def test_schedule_queries_transitions_and_timeline():
    balanced = PrecisionProfile.by_fraction("b", (0.0, 0.7, "int8"), (0.7, 1.0, "int4"))
    s = TransitionPlanner().plan(ScheduleConfig(20, balanced, transition=TransitionStrategy.gradual(3)))
    assert s.precision_at(0) is Precision.INT8 and s.precision_at(19) is Precision.INT4
    t = s.next_transition(0)
    assert t.source is Precision.INT8 and t.target is Precision.INT4 and t.step == 14
    blends = [s.steps[i].blend for i in range(14, 18)]
    assert blends == sorted(blends) and blends[0] < 1 and s.steps[17].blend == 1.0 and s.steps[14].previous is Precision.INT8
    assert s.steps_at_precision(Precision.INT8) == list(range(14))
    assert "int4" in s.timeline() and "~" in s.timeline()
    immediate = TransitionPlanner().plan(ScheduleConfig(20, balanced))
    assert immediate.weight_bytes_ratio() < s.weight_bytes_ratio()  # blending steps touch both precisions' weights


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_noise_axis_takes_each_schedulers_own_noise_levels(sampler):
    prof = preset_profile(ProfilePreset.NOISE_ADAPTIVE)
    for steps in (10, 25):
        sched = make_scheduler(sampler)
        ts, sig = noise_levels(sched, steps)
        assert len(ts) == steps and sig == sorted(sig, reverse=True)  # one level per step, noisy first
        s = plan_for(sched, steps, prof)
        for i, sigma in enumerate(sig):
            assert s.precision_at(i) is (Precision.INT4 if sigma < 1 else Precision.INT8 if sigma < 20 else Precision.FP16)
        assert {s.precision_at(0), s.precision_at(steps - 1)} == {Precision.FP16, Precision.INT4}


def test_hardware_clamp_min_gap_and_memory_budget():
    prof = PrecisionProfile.by_fraction("bf", (0, 1, "bf16"))
    s = TransitionPlanner().plan(ScheduleConfig(4, prof, PrecisionCapabilities.legacy_gpu()))
    assert {x.precision for x in s.steps} == {Precision.FP32}  # no BF16 before Ampere: never lower
    zig = PrecisionProfile.by_fraction("zig", (0, 0.1, "fp16"), (0.1, 0.2, "int8"), (0.2, 0.3, "fp16"), (0.3, 1, "int8"))
    s = TransitionPlanner().plan(ScheduleConfig(10, zig, min_gap=3))
    switches = [t.step for t in s.transitions]
    assert all(b - a >= 3 for a, b in zip(switches, switches[1:]))
    s = TransitionPlanner(memory_budget_bits=8).plan(ScheduleConfig(10, PrecisionProfile.by_fraction("f", (0, 1, "fp16"))))
    assert s.average_bits() <= 8
    with pytest.raises(AdaptiveError, match="cannot fit"):
        TransitionPlanner(memory_budget_bits=2).plan(ScheduleConfig(4, PrecisionProfile.by_fraction("f", (0, 1, "fp16"))))


def test_quantisation_error_and_bytes():
    w = torch.randn(64, 96)
    for p, bound, ratio in ((Precision.INT8, 0.01, 0.27), (Precision.INT6, 0.04, 0.2), (Precision.INT5, 0.08, 0.17), (Precision.INT4, 0.15, 0.17),
                            (Precision.FP16, 1e-3, 0.5)):
        q = quantize(w, p)
        err = (q.dequantize() - w).norm() / w.norm()
        assert err < bound, p
        assert q.nbytes <= ratio * w.numel() * 4, p
    for p in (Precision.INT4, Precision.INT5, Precision.INT6):
        assert quantize(torch.randn(3, 5), p).dequantize().shape == (3, 5)  # padding to the group, to 8 levels


def test_int4_tiers_are_affine_and_symmetric_tiers_still_read():
    """One-sided weights keep all 16 levels (the symmetric grid spent half of them on the sign,
    4x the error here); a tier stored with the symmetric grid (no shift) reads as written."""
    w = torch.rand(64, 96) + 1
    q = quantize(w, Precision.INT4)
    assert q.shift is not None and (q.dequantize() - w).norm() / w.norm() < 0.02
    levels = torch.randint(-8, 8, (64, 2))
    packed = ((levels[:, 0] + 8) | ((levels[:, 1] + 8) << 4)).to(torch.uint8)
    scale = torch.rand(4, 1)
    old = QuantizedTensor(Precision.INT4, torch.Size([8, 16]), packed, scale)
    assert torch.equal(old.dequantize(), (levels.reshape(4, 32).float() * scale).reshape(8, 16))


def test_the_larger_denoiser_is_a_32x32_unet_of_5m_parameters():
    """bench/adaptive.py --models unet5m re-checks the step-sensitivity findings beyond the
    164k-parameter UNet: it must be >= 5 M parameters at 32x32 and denoise 32x32 digits."""
    model = unet5m()
    assert sum(p.numel() for p in model.parameters()) >= 5_000_000
    with torch.no_grad():
        assert model(digits(32)[:2], torch.tensor(10)).sample.shape == (2, 1, 32, 32)


@pytest.fixture(scope="module")
def tiny_unet():
    """A UNet2DModel on 8x8 digits trained for seconds: enough to make real samples differ.
    One thread: the machine is shared and thread spin-waits only slow everyone down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield train(unet(8, (8, 16)), digits(8), 60, batch=32)
    torch.set_num_threads(threads)


def _pipe(model, sampler):
    pipe = DigitsPipeline(model, make_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_switcher_runs_each_call_at_its_steps_precision(tiny_unet, sampler):
    pipe = _pipe(tiny_unet, sampler)
    sched = plan_for(pipe.scheduler, 6, PrecisionProfile.by_fraction("h", (0, 0.5, "int8"), (0.5, 1, "int4")))
    originals = {n: m for n, m in tiny_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    seen = []
    keep = lambda pipe, i, t, kw: seen.append(kw["latents"].clone())  # noqa: E731
    plain = pipe(4, 6, torch.Generator().manual_seed(1), callback_on_step_end=keep).images
    with PrecisionSwitcher(tiny_unet, pipe.scheduler, sched) as sw:
        low = pipe(4, 6, torch.Generator().manual_seed(1), callback_on_step_end=keep).images
        cached = dict(sw.cache)
    expect_calls = 11 if sampler == "heun" else 6  # Heun calls the model twice per step but the last
    assert len(sw.calls) == expect_calls
    assert [c.step for c in sw.calls] == sorted(c.step for c in sw.calls) and {c.step for c in sw.calls} == set(range(6))
    assert all(c.precision is sched.precision_at(c.step) for c in sw.calls)
    assert not torch.equal(seen[0], seen[6])  # the first step already ran at INT8 (images may saturate)
    # Afterwards the model is its FP32 self again, and sampling reproduces exactly.
    assert {n: m for n, m in tiny_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))} == originals
    assert torch.equal(pipe(4, 6, torch.Generator().manual_seed(1)).images, plain)
    with sw:  # a second run reuses every precision's layers, built once
        again = pipe(4, 6, torch.Generator().manual_seed(1)).images
    assert all(sw.cache[p] is cached[p] for p in cached) and torch.equal(again, low)


def test_switcher_blends_on_gradual_steps_and_refuses_a_mismatched_schedule(tiny_unet):
    pipe = _pipe(tiny_unet, "ddim")
    prof = PrecisionProfile.by_fraction("h", (0, 0.5, "fp16"), (0.5, 1, "int4"))
    gradual = plan_for(pipe.scheduler, 8, prof, TransitionStrategy.gradual(2))
    immediate = plan_for(pipe.scheduler, 8, prof)
    with PrecisionSwitcher(tiny_unet, pipe.scheduler, gradual) as sw:
        a = pipe(4, 8, torch.Generator().manual_seed(2)).images
    blended = [c for c in sw.calls if c.previous is not None]
    assert [c.step for c in blended] == [4, 5] and all(0 < c.blend < 1 and c.previous is Precision.FP16 for c in blended)
    fp16, int4 = sw.cache[Precision.FP16].weight_bytes, sw.cache[Precision.INT4].weight_bytes
    assert all(c.weight_bytes == fp16 + int4 for c in blended)
    with PrecisionSwitcher(tiny_unet, pipe.scheduler, immediate):
        b = pipe(4, 8, torch.Generator().manual_seed(2)).images
    assert not torch.equal(a, b)
    with pytest.raises(AdaptiveError, match="8 steps but the scheduler runs 5"):
        with PrecisionSwitcher(tiny_unet, pipe.scheduler, immediate):
            pipe(4, 5, torch.Generator().manual_seed(2))


def test_quanto_layers_are_bit_stable_and_sized(tiny_unet):
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(400)
    outs, sizes = [], {}
    built = [PrecisionLayers(tiny_unet, p) for p in (Precision.INT8, Precision.INT8, Precision.INT4, Precision.FP16, Precision.FP32)]
    for layers in built:  # each built from the FP32 model, then installed in turn
        sizes[layers.precision] = layers.weight_bytes
        layers.install(tiny_unet)
        with torch.no_grad():
            outs.append((tiny_unet(x, t).sample, tiny_unet(x, t).sample))
        assert torch.equal(*outs[-1])  # same output twice
    assert torch.equal(outs[0][0], outs[1][0])  # same weights when built twice
    assert sizes[Precision.INT4] < sizes[Precision.INT8] < sizes[Precision.FP16] == sizes[Precision.FP32] / 2
    assert sizes[Precision.INT8] > sizes[Precision.FP32] / 4  # INT8 counts its scales


def _random_sensitivity(k=6, steps=12, seed=0, int6=False):
    g = torch.Generator().manual_seed(seed)
    windows = tuple((i * steps // k, (i + 1) * steps // k) for i in range(k))
    loss = {"int4": torch.rand(k, generator=g) * 10, "int8": torch.rand(k, generator=g), "fp16": torch.rand(k, generator=g) * 0.01}
    ratio = {"int4": 0.3, "int8": 0.52, "fp16": 1.0}
    if int6:
        loss["int6"], ratio["int6"] = torch.rand(k, generator=g) * 3, 0.39
    return Sensitivity("m", "s", steps, windows, ratio, {p: tuple(v.tolist()) for p, v in loss.items()})


def test_search_is_the_exact_optimum_within_the_budget():
    import itertools

    for seed in range(4):
        sens = _random_sensitivity(seed=seed, int6=seed == 3)  # a measured INT6 is offered too
        assert sens.choices == (CHOICES + (Precision.INT6,) if seed == 3 else CHOICES)
        every = list(itertools.product(sens.choices, repeat=len(sens.windows)))
        for budget in (0.3, 0.35, 0.42, 0.6, 1.0):
            best = min((c for c in every if sens.bytes_of(c) <= budget + 1e-9), key=sens.predicted)
            got = search(sens, budget)
            assert got.predicted_mse == pytest.approx(sens.predicted(best)) and got.weight_bytes_vs_fp16 <= budget + 1e-9
        front = frontier(sens)
        assert [r.weight_bytes_vs_fp16 for r in front] == sorted(r.weight_bytes_vs_fp16 for r in front)
        assert [r.predicted_mse for r in front] == sorted((r.predicted_mse for r in front), reverse=True)
    with pytest.raises(AdaptiveError, match="all-INT4 already touches 30.0%"):
        search(sens, 0.2)
    found = search(sens, 0.42)
    assert [s.precision for s in searched_schedule(found, "p", 24).steps][::2] == [p for p in found.choice for _ in range(2)]
    with pytest.raises(AdaptiveError, match="tile"):
        Sensitivity("m", "s", 12, ((0, 4), (5, 12)), sens.bytes_vs_fp16, sens.loss)


def test_metrics_on_real_samples(tiny_unet):
    from haagenti.adaptive.metrics import frechet, psnr, ssim

    ev = Evaluator(tiny_unet, "euler_a", steps=6, samples=96)
    ref = ev.reference
    assert ssim(ref, ref) == pytest.approx(1.0) and psnr(ref, ref) == float("inf")
    f = ev.classifier.features(ref).detach().numpy()
    assert frechet(f, f) == pytest.approx(0, abs=1e-3) and frechet(f, f + 1) == pytest.approx(f.shape[1], rel=1e-3)
    assert ev.classifier_accuracy > 0.85
    fp16, int8, int4 = (ev.evaluate(uniform(p, 6)) for p in (Precision.FP16, Precision.INT8, Precision.INT4))
    assert fp16.psnr_db > int8.psnr_db > int4.psnr_db and fp16.ssim > int4.ssim
    assert int4.weight_bytes_vs_fp16 < int8.weight_bytes_vs_fp16 < fp16.weight_bytes_vs_fp16 == pytest.approx(1.0)
    w = ev.evaluate(window_schedule(6, 0, 2, Precision.INT4))
    assert w.weight_bytes_vs_fp16 == pytest.approx((2 * int4.weight_bytes_vs_fp16 + 4 * 2) / 6)


def test_cli_schedule_search_and_presets():
    import subprocess
    import sys
    # The real console once (a subprocess), every mistake in this process: each start imports torch.
    p = subprocess.run([sys.executable, "-m", "haagenti.cli", "schedule", "search", "--budget", "0.4", "--sampler", "dpmpp2m"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "search@0.4 unet/dpmpp2m: 20 steps" in p.stdout and "predicted MSE" in p.stdout
    share = float(p.stdout.split("measured weight bytes ")[1].split("%")[0])
    assert share <= 40.0
    for args, msg in ((("search", "--budget", "0.1"), "no schedule fits 10%"), (("search", "--budget", "0.4", "--sampler", "plms"), "no measured sensitivity"),
                      (("search", "--budget", "0.4", "--sensitivity", "/nonexistent.json"), "cannot read"), (("--preset", "fast"), "unknown preset"),
                      (("--sampler", "plms"), "unknown sampler"), (("--transition", "gradual:x"), "unknown transition")):
        code, _, err = cli("schedule", *args)
        assert code == 1 and msg in err, (args, err)
    code, out, err = cli("schedule", "--preset", "noise_adaptive", "--sampler", "heun", "--steps", "12")
    assert code == 0 and "12 steps" in out, err


def test_precision_tiers_in_the_library(tmp_path, family):
    from safetensors.torch import load_file

    from haagenti.adaptive.tiers import add_tier, load_model, tier_id
    from haagenti.config import LibraryConfig
    from haagenti.library import FragmentLibrary

    lib = FragmentLibrary.open(str(tmp_path / "lib"), LibraryConfig(fragment_size=64 * 1024))
    base = family[0]
    lib.ingest([base.file], base.model_id, base.family)
    report = add_tier(lib, base.model_id, "int8")
    assert report.plain > 0
    tier_frags = lib.manifest(tier_id(base.model_id, Precision.INT8)).fragment_ids
    quality = dict(zip(*(lib.store.read("fragments", ["fragment_id", "quality"])[c].to_pylist() for c in ("fragment_id", "quality"))))
    assert {quality[f] for f in tier_frags} >= {"int8"}
    seen = set()
    real = lib.store.read_fragments
    lib.store.read_fragments = lambda ids, *a, **k: (seen.update(ids), real(ids, *a, **k))[1]
    got = load_model(lib, base.model_id, "int8")
    assert seen <= tier_frags
    exact = load_file(base.file)
    assert got.keys() == exact.keys()
    w = next(k for k in exact if exact[k].dim() == 2)
    err = (got[w].float() - exact[w].float()).norm() / exact[w].float().norm()
    assert 0 < err < 0.02
    assert torch.equal(load_model(lib, base.model_id, "fp32")[w], exact[w])


def test_adaptive_precision_without_its_extra_names_the_extra_in_one_line():
    """With diffusers not importable, `haagenti schedule` exits 1 with one line naming
    `pip install 'haagenti[adaptive]'`, not a ModuleNotFoundError traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['diffusers'] = None; sys.argv = ['haagenti', 'schedule', '--steps', '10'];"
            "from haagenti.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    text = (r.stdout + r.stderr).strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "pip install 'haagenti[adaptive]'" in text and "diffusers" in text
