"""Adaptive precision, measured on diffusers: for the digits UNet (UNet2DModel, 16x16) and the
MLP (8x8), under DDIM (eta 0), DPM-Solver++ 2M and Euler ancestral: the per-step sensitivity
sweep, uniform precisions, searched schedules over budgets, the presets, the additive-error check,
and which ecosystem quantiser runs here (torchao / optimum-quanto: conv support, bit-stability).

    python bench/adaptive.py [--steps 20] [--samples 256] [--window 4] [--ship]

Models are trained on first use under /tmp/haagenti-heavy.lock (minutes of CPU) and cached in
bench/.cache/adaptive as diffusers folders (the digits classifiers, seconds each, beside them); results go to bench/.cache/adaptive/out/adaptive.{md,json} and adaptive-SAMPLER.png.
--ship copies the measured sensitivity into haagenti/adaptive/sensitivity.json (the presets and
`haagenti schedule search` read it).
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--models", default="unet,mlp")
    ap.add_argument("--samplers", default="ddim,dpmpp2m,euler_a")
    ap.add_argument("--ship", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = os.path.join(CACHE, "adaptive")
    os.makedirs(base, exist_ok=True)
    models, samplers = args.models.split(","), args.samplers.split(",")
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
    doc["ecosystem"] = ecosystem(load_or_train("unet", os.path.join(base, "unet"), 0))
    with open(os.path.join(base, "out", "adaptive.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
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
