"""Adaptive precision, measured on diffusers: for the digits UNet (UNet2DModel, 16x16) and the
MLP (8x8), under DDIM (eta 0), DPM-Solver++ 2M and Euler ancestral: the per-step sensitivity
sweep, uniform precisions, searched schedules over budgets, the presets, the additive-error check,
and which ecosystem quantiser runs here (torchao / optimum-quanto: conv support, bit-stability).

    python bench/adaptive.py [--models unet,mlp] [--steps 20] [--samples 256] [--window 4] [--ship]
    python bench/adaptive.py --residency [--models unet] [--runs 3] [--samplers ddim,dpmpp2m,euler_a]
    python bench/adaptive.py --tier-frontier [--models unet] [--samplers dpmpp2m] [--window 4] [--also-tiers int6,int5] [--budget 0.4 --best 24]

--models unet5m is the larger denoiser (6.3 M parameters at 32x32; ~20 minutes of training on
one thread): the sweep measures its sensitivity (and writes out/sensitivity-unet5m.json, whose
balanced schedule --residency --models unet5m then streams).

--residency measures what the balanced schedule keeps in memory on each model, per sampler, in
four configurations, each in a fresh process (so its peak RSS is its own): the FP16 pipeline
(the model in FP16), every tier resident (the switcher's quanto layers built from the model,
beside its FP32 weights), every tier read from the library and kept (StreamingSwitcher
keep_all), and tiers streamed from the library as the schedule goes (StreamingSwitcher): peak
resident weight bytes (counted exactly), peak RSS, seconds per image over --runs calls, and
quality against FP32 samples from the same noise. The library (the models and their INT8/INT4
tiers) is built in bench/.cache/adaptive/library on first use.

--tier-frontier samples every INT8/INT4 choice per window (--window steps) with the tiers
streamed from that library, from the same noise as FP32: the cheapest that keeps the Frechet
distance within 1.1x FP32's, and the additive-error check on those tiers (tier-frontier.json).
--also-tiers offers INT6/INT5 too (added to the library on first use); --budget keeps the
choices within that share of FP16 weight bytes and --best the N of them with the least
predicted loss (each window's measured loss alone, summed), where all would take too long. The
per-window losses are written as a sensitivity file (tier-sensitivity.json) that
`haagenti schedule search --sensitivity` reads.

Models are trained on first use under /tmp/haagenti-heavy.lock (minutes of CPU) and cached in
bench/.cache/adaptive as diffusers folders (the digits classifiers, seconds each, beside them); results go to bench/.cache/adaptive/out/adaptive.{md,json} and adaptive-SAMPLER.png.
--ship copies the measured sensitivity into haagenti/adaptive/sensitivity.json (the presets and
`haagenti schedule search` read it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import CACHE

from haagenti.adaptive.models import load_or_train
from haagenti.adaptive.report import TRAIN_ITERS, additivity_summary, early_late, evaluate_all, runs_per_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ecosystem(model) -> list[dict]:
    """Each library's weight-only INT8/INT4 on the UNet on CPU: does it run, which layers it
    quantises, is it bit-stable (same output twice, same weights when built twice)."""
    x = torch.randn(8, 1, model.config.sample_size, model.config.sample_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        ref = model(x, t).sample
    rows = []

    def quanto(bits):
        from optimum.quanto import freeze, qint4, qint8, quantize

        m = copy.deepcopy(model)
        quantize(m, weights=qint8 if bits == 8 else qint4)
        freeze(m)
        return m

    def torchao(bits, convs=False):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        m = copy.deepcopy(model)
        cfg = Int8WeightOnlyConfig() if bits == 8 else IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        quantize_(m, cfg, filter_fn=(lambda mod, fqn: isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))) if convs else None)
        return m

    for lib, build, kw in (("optimum-quanto", quanto, {}), ("torchao", torchao, {}), ("torchao incl. Conv2d", torchao, {"convs": True})):
        for bits in (8, 4):
            row = {"library": lib, "bits": bits}
            try:
                a, b = build(bits, **kw), build(bits, **kw)
                with torch.no_grad():
                    o1, o2, o3 = a(x, t).sample, a(x, t).sample, b(x, t).sample
                layers = [(n, m) for n, m in a.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
                quantised = [n for n, m in layers if type(m.weight) not in (torch.Tensor, torch.nn.Parameter)]
                row.update(runs=True, layers_quantised=f"{len(quantised)}/{len(layers)}", same_output_twice=torch.equal(o1, o2),
                           same_when_rebuilt=torch.equal(o1, o3), rel_error=float((o1 - ref).norm() / ref.norm()))
            except Exception as e:  # a library that does not run here is a result, not a crash
                row.update(runs=False, error=f"{type(e).__name__}: {str(e)[:120]}")
            rows.append(row)
    return rows


RESIDENCY_MODES = ("fp16", "resident", "library", "streamed")


def half(model):
    """The FP16 pipeline's denoiser: FP16 weights and activations; the sampler's state stays
    FP32, as diffusers' schedulers keep it (hooks cast the call's input and output)."""
    model.half()
    model.register_forward_pre_hook(lambda m, args: (args[0].half(), *args[1:]))

    def to_fp32(m, args, out):
        out.sample = out.sample.float()
        return out

    model.register_forward_hook(to_fp32)
    return model


def rss(field: str) -> int:
    """This process's VmRSS (now) or VmHWM (peak since the last reset_peak_rss), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: writing 5 to clear_refs), so the peak seen
    is the configuration's, not the imports' (which alone peak above this small model's run)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def residency_library(base: str, kind: str, tiers: tuple[str, ...] = ("int8", "int4")):
    """The model (stored under its kind's name) and its `tiers` in a library (each built once)."""
    from haagenti.adaptive.tiers import add_tier, tiers_of
    from haagenti.library import FragmentLibrary

    lib = FragmentLibrary.open(os.path.join(base, "library"))
    if kind not in {m["model_id"] for m in lib.models()}:
        lib.ingest([os.path.join(base, kind, "diffusion_pytorch_model.safetensors")], kind, "digits")
    for p in tiers:
        if p not in {t.value for t in tiers_of(lib, kind)}:
            add_tier(lib, kind, p)
    return lib


SHIPPED = ("unet", "mlp")  # models whose sensitivity haagenti ships (haagenti/adaptive/sensitivity.json)


def sensitivity_file(base: str, kind: str) -> str | None:
    """Where the balanced preset finds `kind`'s measured sensitivity: the shipped copy, or the
    one this bench's sweep wrote for a larger model."""
    return None if kind in SHIPPED else os.path.join(base, "out", f"sensitivity-{kind}.json")


def residency_run(base: str, kind: str, sampler: str, mode: str, steps: int, samples: int, runs: int, images_out: str) -> dict:
    """One configuration, in this process: its peak weight bytes, peak RSS, seconds per image."""
    from haagenti.adaptive import ProfilePreset, preset_profile
    from haagenti.adaptive.precision import Precision
    from haagenti.adaptive.quantize import held_bytes
    from haagenti.adaptive.residency import StreamingSwitcher
    from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler
    from haagenti.adaptive.switch import PrecisionSwitcher, plan_for
    from haagenti.adaptive.tiers import LayerTiers

    torch.set_num_threads(1)
    lib = residency_library(base, kind) if mode in ("library", "streamed") else None
    reset_peak_rss()
    rss_before = rss("VmRSS")
    model = load_or_train(kind, os.path.join(base, kind), 0)
    scheduler = make_scheduler(sampler)
    schedule = plan_for(scheduler, steps, preset_profile(ProfilePreset.BALANCED, sampler, kind, sensitivity_file(base, kind)))
    if mode == "fp16":
        denoiser = half(model)
        switcher = None
    else:
        denoiser = model
        switcher = (PrecisionSwitcher(model, scheduler, schedule) if mode == "resident" else
                    StreamingSwitcher(model, scheduler, schedule, LayerTiers(lib, kind), keep_all=mode == "library"))
    pipe = DigitsPipeline(denoiser, scheduler)
    pipe.set_progress_bar_config(disable=True)
    seconds = []
    runs = 1 if mode == "fp16" else runs  # no fast FP16 kernels on CPU (~30x FP32 here): one call gives its bytes and RSS
    with switcher if switcher is not None else contextlib.nullcontext():
        for _ in range(runs):
            start = time.perf_counter()
            images = pipe(samples, steps, torch.Generator().manual_seed(0)).images
            seconds.append((time.perf_counter() - start) / samples)
        if mode == "resident":
            peak = switcher.resident_bytes()  # all built on entering, held throughout
    if mode == "fp16":
        peak = held_bytes(denoiser)
    elif mode != "resident":
        peak = switcher.peak_bytes
    torch.save(images, images_out)
    touched = switcher.weight_bytes() / (len(switcher.calls) * switcher.weight_bytes_at(Precision.FP16)) if switcher is not None else 1.0
    return {"model": kind, "touched_vs_fp16": touched, "sampler": sampler, "mode": mode, "schedule": schedule.timeline().splitlines()[0], "peak_weight_bytes": peak, "peak_rss": rss("VmHWM"),
            "rss_before_model": rss_before, "seconds_per_image": seconds, "waits": getattr(switcher, "waits", 0),
            "loads": len(getattr(switcher, "loads", []))}


def residency(base: str, kind: str, samplers: list[str], steps: int, samples: int, runs: int) -> list[dict]:
    """Every sampler x configuration in its own process, then quality against FP32 samples."""
    from haagenti.adaptive.metrics import frechet, load_or_train_classifier, psnr
    from haagenti.adaptive.models import digits
    from haagenti.adaptive.sampling import DigitsPipeline, make_scheduler

    residency_library(base, kind)
    model = load_or_train(kind, os.path.join(base, kind), 0)
    clf, _ = load_or_train_classifier(os.path.join(base, f"classifier{model.config.sample_size}.safetensors"), model.config.sample_size)
    with torch.no_grad():
        data = clf.features(digits(model.config.sample_size)).numpy()
    rows = []
    with tempfile.TemporaryDirectory(prefix="haagenti-residency-") as tmp:
        for sampler in samplers:
            pipe = DigitsPipeline(model, make_scheduler(sampler))
            pipe.set_progress_bar_config(disable=True)
            ref = pipe(samples, steps, torch.Generator().manual_seed(0)).images
            with torch.no_grad():
                ref_labels, ref_fd = clf(ref).argmax(1), frechet(clf.features(ref).numpy(), data)
            images = {}
            for mode in RESIDENCY_MODES:
                out = os.path.join(tmp, f"{sampler}-{mode}.pt")
                cmd = [sys.executable, os.path.abspath(__file__), "--residency-run", f"{kind}:{sampler}:{mode}:{out}", "--steps", str(steps),
                       "--samples", str(samples), "--runs", str(runs)]
                row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                images[mode] = x = torch.load(out)
                with torch.no_grad():
                    row.update(psnr_vs_fp32_db=psnr(x, ref), class_agreement=float((clf(x).argmax(1) == ref_labels).float().mean()),
                               frechet=frechet(clf.features(x).numpy(), data), frechet_fp32=ref_fd)
                rows.append(row)
            rows[-1]["bit_identical_to_library"] = torch.equal(images["streamed"], images["library"])
    return rows


def residency_table(rows: list[dict], load: str) -> str:
    lines = [f"load average at start: {load}", "",
             "| model | sampler | configuration | bytes touched vs FP16 | peak weight bytes | vs FP16 pipeline | peak RSS (MiB) | peak RSS above the process before the model (MiB) | s/image min/median/max | vs all resident (median) | PSNR vs FP32 | FD (FP32) | class agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fp16, resident = (next(x for x in rows if (x["model"], x["sampler"], x["mode"]) == (r["model"], r["sampler"], m)) for m in ("fp16", "resident"))
        s = r["seconds_per_image"]
        lines.append(f"| {r['model']} | {r['sampler']} | {r['mode']} | {r['touched_vs_fp16']:.1%} | {r['peak_weight_bytes']:,} | {r['peak_weight_bytes'] / fp16['peak_weight_bytes']:.1%} |"
                     f" {r['peak_rss'] / 2**20:.1f} | {(r['peak_rss'] - r['rss_before_model']) / 2**20:.1f} |"
                     f" {min(s) * 1e3:.2f}/{statistics.median(s) * 1e3:.2f}/{max(s) * 1e3:.2f} ms |"
                     f" {statistics.median(s) / statistics.median(resident['seconds_per_image']):.3f}x | {r['psnr_vs_fp32_db']:.1f} dB |"
                     f" {r['frechet']:.1f} ({r['frechet_fp32']:.1f}) | {r['class_agreement']:.3f} |")
    return "\n".join(lines)


def tier_frontier(base: str, kind: str, sampler: str, steps: int, samples: int, window: int, also: tuple[str, ...] = (),
                  budget: float | None = None, best: int | None = None) -> dict:
    """Every choice per window of `window` steps among INT8, INT4 and the `also` tiers (within
    `budget`, the `best` by predicted loss), streamed from the library's tiers, each from the same
    noise as FP32: which budget meets FD <= 1.1 x FP32, and the additive-error check on these
    tiers (measured MSE vs the sum of each window's MSE alone, the rest FP32)."""
    import itertools

    from haagenti.adaptive.evaluate import Evaluator, uniform, window_schedule
    from haagenti.adaptive.precision import Precision
    from haagenti.adaptive.residency import StreamingSwitcher
    from haagenti.adaptive.schedule import PrecisionSchedule, StepPrecision
    from haagenti.adaptive.search import Sensitivity
    from haagenti.adaptive.tiers import LayerTiers

    offered = [Precision.INT8, *(Precision.parse(p) for p in also), Precision.INT4]
    tiers = LayerTiers(residency_library(base, kind, tuple(p.value for p in offered)), kind)
    model = load_or_train(kind, os.path.join(base, kind), 0)
    ev = Evaluator(model, sampler, steps, samples, classifier_path=os.path.join(base, f"classifier{model.config.sample_size}.safetensors"),
                   switcher=lambda m, sch, plan: StreamingSwitcher(m, sch, plan, tiers))
    fp32, fp16 = (ev.evaluate(uniform(p, steps)) for p in (Precision.FP32, Precision.FP16))
    windows = [(a, min(a + window, steps)) for a in range(0, steps, window)]
    loss = {p.value: tuple(ev.evaluate(window_schedule(steps, a, b, p)).mse for a, b in windows) for p in offered}
    loss["fp16"] = tuple(fp16.mse * (b - a) / steps for a, b in windows)
    sens = Sensitivity(kind, sampler, steps, tuple(windows), {p.value: ev.switcher.weight_bytes_at(p) / ev.fp16_bytes for p in (*offered, Precision.FP16)},
                       loss, samples)
    choices = [c for c in itertools.product(offered, repeat=len(windows)) if budget is None or sens.bytes_of(c) <= budget + 1e-9]
    rows = []
    for choice in sorted(choices, key=sens.predicted)[:best]:
        steps_at = [StepPrecision(i, p) for p, (a, b) in zip(choice, windows) for i in range(a, b)]
        r = ev.evaluate(PrecisionSchedule(steps_at, [], "".join(p.value[-1] for p in choice)))
        rows.append({**r.row(), "frechet_ratio": r.frechet / fp32.frechet, "predicted_mse": sens.predicted(choice)})
    ratio = np.array([r["mse"] / r["predicted_mse"] for r in rows])
    met = [r for r in rows if r["frechet_ratio"] <= 1.1]
    return {"model": kind, "sampler": sampler, "samples": samples, "window": window, "tiers": [p.value for p in offered], "budget": budget,
            "candidates": len(choices), "sensitivity": sens.to_dict(), "fp32_frechet": fp32.frechet, "fp32_frechet_other_seed": ev.frechet_other_seed(),
            "schedules": sorted(rows, key=lambda r: r["weight_bytes_vs_fp16"]),
            "cheapest_meeting_fd": min(met, key=lambda r: r["weight_bytes_vs_fp16"]) if met else None,
            "additivity": {"ratio_min": float(ratio.min()), "ratio_median": float(np.median(ratio)), "ratio_max": float(ratio.max()),
                           "pearson_r": float(np.corrcoef([r["predicted_mse"] for r in rows], [r["mse"] for r in rows])[0, 1])}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--models", help="comma-separated: unet, mlp, unet5m (default: unet,mlp; unet for --residency and --tier-frontier)")
    ap.add_argument("--samplers", default="ddim,dpmpp2m,euler_a")
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--residency", action="store_true", help="measure residency (see the module's docstring)")
    ap.add_argument("--runs", type=int, default=3, help="--residency: timed pipeline calls per configuration")
    ap.add_argument("--tier-frontier", action="store_true", help="every INT8/INT4 (and --also-tiers) window choice streamed from the library's tiers, per sampler")
    ap.add_argument("--also-tiers", default="", help="--tier-frontier: offer these tiers too (int6, int5)")
    ap.add_argument("--budget", type=float, help="--tier-frontier: only choices within this share of FP16 weight bytes")
    ap.add_argument("--best", type=int, help="--tier-frontier: only the N choices with the least predicted loss")
    ap.add_argument("--residency-run", help=argparse.SUPPRESS)  # MODEL:SAMPLER:MODE:IMAGES_OUT, one configuration in this process
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = os.path.join(CACHE, "adaptive")
    os.makedirs(base, exist_ok=True)
    if args.residency_run:
        kind, sampler, mode, out = args.residency_run.split(":", 3)
        print(json.dumps(residency_run(base, kind, sampler, mode, args.steps, args.samples, args.runs, out)))
        return
    if args.tier_frontier:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        also = tuple(p for p in args.also_tiers.split(",") if p)
        docs = [tier_frontier(base, kind, sampler, args.steps, args.samples, args.window, also, args.budget, args.best)
                for kind in (args.models or "unet").split(",") for sampler in args.samplers.split(",")]
        os.makedirs(os.path.join(base, "out"), exist_ok=True)
        with open(os.path.join(base, "out", "tier-frontier.json"), "w") as f:
            json.dump({"load_average": load, "runs": docs}, f, indent=1)
        with open(os.path.join(base, "out", "tier-sensitivity.json"), "w") as f:
            json.dump({"run": " ".join(sys.argv), "sensitivity": [d["sensitivity"] for d in docs]}, f, indent=1)
        for d in docs:
            a = d["additivity"]
            tier_bytes = ", ".join(f"{p} {b:.1%}" for p, b in d["sensitivity"]["bytes_vs_fp16"].items())
            print(f"{d['model']} {d['sampler']}: FP32 FD {d['fp32_frechet']:.1f} (other noise {d['fp32_frechet_other_seed']:.1f}); measured/predicted MSE"
                  f" {a['ratio_min']:.2f}/{a['ratio_median']:.2f}/{a['ratio_max']:.2f}, r={a['pearson_r']:.3f}; {len(d['schedules'])} of {d['candidates']} choices;"
                  f" bytes vs FP16: {tier_bytes}")
            for r in d["schedules"]:
                print(f"  {r['name']}  bytes {r['weight_bytes_vs_fp16']:.1%}  FD ratio {r['frechet_ratio']:.3f}  PSNR {r['psnr_db']:.1f} dB"
                      f"  agreement {r['class_agreement']:.3f}  MSE {r['mse']:.5f} (predicted {r['predicted_mse']:.5f})")
            best = d["cheapest_meeting_fd"]
            print(f"  cheapest with FD <= 1.1 x FP32: {best['name'] + ' at ' + format(best['weight_bytes_vs_fp16'], '.1%') if best else 'none'}")
        return
    if args.residency:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        rows = [r for kind in (args.models or "unet").split(",") for r in residency(base, kind, args.samplers.split(","), args.steps, args.samples, args.runs)]
        os.makedirs(os.path.join(base, "out"), exist_ok=True)
        with open(os.path.join(base, "out", "residency.json"), "w") as f:
            json.dump({"load_average": load, "steps": args.steps, "samples": args.samples, "runs": rows}, f, indent=1)
        print(residency_table(rows, load))
        print("streamed bit-identical to library-resident:", {f"{r['model']}/{r['sampler']}": r["bit_identical_to_library"] for r in rows if "bit_identical_to_library" in r})
        return
    models, samplers = (args.models or "unet,mlp").split(","), args.samplers.split(",")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        for kind in models:  # training (minutes of CPU) under the shared heavy lock; sampling is one thread, ~0.5 GB
            if not os.path.exists(os.path.join(base, kind, "config.json")):
                with open("/tmp/haagenti-heavy.lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    trained = bar.add_task(f"train {kind}", total=TRAIN_ITERS[kind])
                    load_or_train(kind, os.path.join(base, kind), TRAIN_ITERS[kind], lambda: bar.advance(trained))
        task = bar.add_task("sampling runs", total=len(models) * len(samplers) * runs_per_pair(args.steps, args.window))
        doc = evaluate_all(os.path.join(base, "out"), models, samplers, args.steps, args.samples, args.window, model_dir=base,
                           progress=lambda stage: bar.console.print(f"adaptive: {stage} done"), tick=lambda: bar.advance(task))
    doc["ecosystem"] = ecosystem(load_or_train(models[0], os.path.join(base, models[0]), 0))
    with open(os.path.join(base, "out", "adaptive.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
    for kind in models:  # a larger model's sensitivity, kept per sampler across sweeps of other samplers
        path = sensitivity_file(base, kind)
        if path is not None:
            kept = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = json.load(f)["sensitivity"]
            new = [s for s in doc["sensitivity"] if s["model"] == kind]
            with open(path, "w") as f:
                json.dump({"sensitivity": [s for s in kept if s["sampler"] not in {n["sampler"] for n in new}] + new}, f, indent=1)
    print(f"{args.samples} samples, {args.steps} steps, windows of {args.window}; same noise per schedule; 1 thread; shared machine\n")
    for p in doc["pairs"]:
        e4, l4 = early_late(p, "int4")
        e8, l8 = early_late(p, "int8")
        a, t = additivity_summary(p), p["target"]
        print(f"{p['model']:4s} {p['sampler']:8s} PSNR vs FP32 with the first/last 30% of steps quantised alone: INT4 {e4:5.1f}/{l4:5.1f} dB, INT8 {e8:5.1f}/{l8:5.1f} dB;"
              f" additive MSE measured/predicted {a['ratio_min']:.2f}/{a['ratio_median']:.2f}/{a['ratio_max']:.2f} (r={a['pearson_r']:.3f}, n={a['n']})")
        if "name" in t:
            print(f"     target: {t['name']} {t['weight_bytes_vs_fp16']:.1%} of FP16 bytes, NN-PSNR loss {t['nn_psnr_loss_db']:.2f} dB, PSNR vs FP32 {t['psnr_vs_fp32_db']:.1f} dB,"
                  f" FD ratio {t['frechet_ratio']:.3f} -> {'met' if t['met'] else 'NOT met'}")
    for r in doc["ecosystem"]:
        print("ecosystem:", r)
    print(f"wrote {base}/out/adaptive.md, adaptive.json, adaptive-*.png")
    if args.ship:
        with open(os.path.join(ROOT, "haagenti", "adaptive", "sensitivity.json"), "w") as f:
            json.dump({"run": f"python bench/adaptive.py --steps {args.steps} --samples {args.samples} --window {args.window} --ship",
                       "sensitivity": doc["sensitivity"]}, f, indent=1)


if __name__ == "__main__":
    main()
