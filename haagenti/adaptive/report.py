"""`haagenti schedule evaluate`: train (or reuse) the digits DDPM, measure presets, the
sensitivity sweep and the target search, and write a table, JSON and a plot."""
from __future__ import annotations

import json
import os
from typing import Callable

import torch

from haagenti.adaptive.denoiser import DigitsDenoiser, train_denoiser
from haagenti.adaptive.evaluate import Evaluator, quality_factors


def load_or_train(path: str, iters: int = 4000) -> DigitsDenoiser:
    model = DigitsDenoiser()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_denoiser(iters)
    torch.save(model.state_dict(), path)
    return model


STAGES = ("denoiser", "presets", "sensitivity", "target search", "report")


def evaluate_all(out_dir: str, steps: int = 30, samples: int = 512, iters: int = 4000, progress: Callable[[str], None] | None = None) -> dict:
    """Every measurement and the report files; `progress(stage)` is called as each of STAGES ends."""
    done = progress or (lambda stage: None)
    os.makedirs(out_dir, exist_ok=True)
    ev = Evaluator(load_or_train(os.path.join(out_dir, "denoiser.pt"), iters), steps, samples)
    done("denoiser")
    presets = ev.presets() + [ev.evaluate(ev.seed_schedule())]
    done("presets")
    sensitivity = ev.sensitivity()
    done("sensitivity")
    best, tried = ev.find_target()
    done("target search")
    doc = {
        "steps": steps, "samples": samples,
        "presets": [r.row() for r in presets],
        "sensitivity": sensitivity,
        "target_search": [r.row() for r in tried],
        "target": best.row() if best else None,
        "quality_factors": quality_factors(presets),
    }
    with open(os.path.join(out_dir, "adaptive.json"), "w") as f:
        json.dump(doc, f, indent=2, default=float)
    with open(os.path.join(out_dir, "adaptive.md"), "w") as f:
        f.write(table(presets + tried))
    _plot(presets, sensitivity, os.path.join(out_dir, "adaptive.png"))
    done("report")
    return doc


def table(results) -> str:
    head = "| schedule | PSNR vs FP32 (dB) | SSIM | class agreement | NN-PSNR (dB) | weight bytes vs FP16 | time (s) |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r.name} | {r.psnr_db:.1f} | {r.ssim:.3f} | {r.class_agreement:.3f} | {r.nn_psnr_db:.2f} | {r.weight_bytes_vs_fp16:.3f} | {r.seconds:.3f} |\n" for r in results
    )


def _plot(presets, sensitivity, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in presets:
        a.scatter(r.weight_bytes_vs_fp16, r.class_agreement)
        a.annotate(r.name, (r.weight_bytes_vs_fp16, r.class_agreement), fontsize=8)
    a.set_xlabel("weight bytes touched / all-FP16")
    a.set_ylabel("class agreement with FP32 samples")
    a.set_title("quality vs memory per schedule")
    xs = [row["window"] for row in sensitivity]
    for key in ("int8_psnr_db", "int4_psnr_db"):
        b.plot(xs, [row[key] for row in sensitivity], marker="o", label=key.split("_")[0].upper())
    b.set_xticks(xs, [row["steps"] for row in sensitivity])
    b.set_xlabel("window of steps quantised (early -> late)")
    b.set_ylabel("PSNR vs FP32 (dB, higher = less harm)")
    b.set_title("sensitivity per step window")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
