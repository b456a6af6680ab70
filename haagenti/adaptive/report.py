"""`haagenti schedule evaluate` and bench/adaptive.py: for each model and sampler, the
per-step sensitivity sweep, uniform precisions, searched schedules over a range of budgets,
the presets (named budget points), a check of the additive-error assumption, and plots."""
from __future__ import annotations

import json
import os
import random
from typing import Callable

import numpy as np
import torch

from haagenti.adaptive.evaluate import Evaluator, ScheduleResult, uniform, window_schedule
from haagenti.adaptive.models import KINDS, load_or_train
from haagenti.adaptive.precision import Precision
from haagenti.adaptive.profile import ProfilePreset
from haagenti.adaptive.schedule import searched_schedule
from haagenti.adaptive.search import CHOICES, SearchResult, Sensitivity, search

BUDGETS = tuple(sorted({0.35, 0.4, 0.5, 0.6} | {p.budget for p in ProfilePreset if p.budget is not None}))  # presets are budget points
TRAIN_ITERS = {"unet": 1500, "mlp": 4000, "unet5m": 1200}


def sweep(ev: Evaluator, width: int, model: str, tick) -> tuple[Sensitivity, list[dict], dict[str, ScheduleResult]]:
    """One window of `width` steps at INT8 and at INT4, the rest FP32; plus uniform precisions."""
    uni = {}
    for p in (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4):
        uni[p.value] = ev.evaluate(uniform(p, ev.steps))
        tick()
    windows = [(a, min(a + width, ev.steps)) for a in range(0, ev.steps, width)]
    rows, loss = [], {p.value: [] for p in CHOICES}
    for a, b in windows:
        row = {"steps": f"{a}-{b - 1}"}
        for p in (Precision.INT8, Precision.INT4):
            r = ev.evaluate(window_schedule(ev.steps, a, b, p))
            tick()
            row[p.value] = r.row()
            loss[p.value].append(r.mse)
        loss["fp16"].append(uni["fp16"].mse * (b - a) / ev.steps)
        rows.append(row)
    ratio = {k: uni[k].weight_bytes_vs_fp16 for k in ("int4", "int8", "fp16")}
    return Sensitivity(model, ev.sampler, ev.steps, tuple(windows), ratio, {k: tuple(v) for k, v in loss.items()}, ev.samples), rows, uni


def search_pair(ev: Evaluator, sens: Sensitivity, tick) -> dict:
    """Searched schedules over BUDGETS (the presets among them), the additivity check on those
    and 3 random window choices, and FP32's Frechet distance from other noise."""
    searched = []
    for budget in BUDGETS:
        try:
            found = search(sens, budget)
        except ValueError:
            continue
        r = ev.evaluate(searched_schedule(found, f"search@{budget:.2f}"))
        tick()
        searched.append({"budget": budget, "choice": [p.value for p in found.choice], "predicted_mse": found.predicted_mse, **r.row()})
    by_budget = {s["budget"]: s for s in searched}
    presets = [dict(by_budget[p.budget], name=p.value) for p in ProfilePreset if p.budget in by_budget]
    rng = random.Random(0)
    additivity = [{"name": s["name"], "predicted_mse": s["predicted_mse"], "measured_mse": s["mse"]} for s in searched]
    for k in range(3):
        choice = tuple(rng.choice(CHOICES) for _ in sens.windows)
        r = ev.evaluate(searched_schedule(SearchResult(choice, sens.bytes_of(choice), sens.predicted(choice), sens), f"random{k}"))
        tick()
        additivity.append({"name": r.name, "predicted_mse": sens.predicted(choice), "measured_mse": r.mse})
    noise_floor = ev.frechet_other_seed()
    tick()
    return {"searched": searched, "presets": presets, "additivity": additivity, "fp32_frechet_other_seed": noise_floor}


def target(fp32: ScheduleResult, searched: list[dict], max_bytes: float = 0.4, max_db: float = 1.0, max_fd: float = 1.1) -> dict:
    """The issue's target: <= 40% of FP16 weight bytes, <= 1 dB NN-PSNR lost, Frechet distance
    within 10% of FP32's. Reports the searched schedule at the 40% budget and whether it meets it."""
    at = [s for s in searched if s["weight_bytes_vs_fp16"] <= max_bytes + 1e-9]
    if not at:
        return {"met": False, "why": f"no searched schedule fits {max_bytes:.0%}"}
    best = min(at, key=lambda s: s["mse"])
    loss_db = fp32.nn_psnr_db - best["nn_psnr_db"]
    fd_ratio = best["frechet"] / fp32.frechet
    return {"name": best["name"], "weight_bytes_vs_fp16": best["weight_bytes_vs_fp16"], "nn_psnr_loss_db": loss_db, "psnr_vs_fp32_db": best["psnr_db"],
            "frechet_ratio": fd_ratio, "met": loss_db <= max_db and fd_ratio <= max_fd}


STAGES = ("models", "sensitivity", "search", "report")


def runs_per_pair(steps: int, width: int) -> int:
    windows = -(-steps // width)
    return 4 + 2 * windows + len(BUDGETS) + 3 + 1  # an upper bound: budgets below all-INT4 are skipped


def evaluate_all(out_dir: str, models=KINDS, samplers=("ddim", "dpmpp2m", "euler_a"), steps: int = 20, samples: int = 256, width: int = 4,
                 model_dir: str | None = None, train_iters: int | None = None, progress: Callable[[str], None] | None = None,
                 tick: Callable[[], None] | None = None) -> dict:
    """Every measurement and the report files in OUT_DIR; models (and the digits classifiers) are
    trained into MODEL_DIR (default OUT_DIR) when absent. `progress(stage)` is called as each of
    STAGES ends; `tick()` after every sampling run (runs_per_pair per model and sampler).
    Runs torch on one thread: these models are so small that a second thread only waits, and
    on a busy machine its spinning made training and sampling 10-20x slower (docs/decisions/
    0029-everyday-use.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate_all(out_dir, models, samplers, steps, samples, width, model_dir, train_iters, progress, tick)
    finally:
        torch.set_num_threads(threads)


def _evaluate_all(out_dir: str, models, samplers, steps: int, samples: int, width: int, model_dir: str | None, train_iters: int | None,
                  progress: Callable[[str], None] | None, tick: Callable[[], None] | None) -> dict:
    done, tick = progress or (lambda stage: None), tick or (lambda: None)
    os.makedirs(out_dir, exist_ok=True)
    model_dir = model_dir or out_dir
    evaluators = []
    for kind in models:
        model = load_or_train(kind, os.path.join(model_dir, kind), train_iters or TRAIN_ITERS[kind])
        for sampler in samplers:
            clf = os.path.join(model_dir, f"classifier{model.config.sample_size}.safetensors")
            evaluators.append((kind, Evaluator(model, sampler, steps, samples, classifier_path=clf)))
    done("models")
    swept = [(kind, ev, *sweep(ev, width, kind, tick)) for kind, ev in evaluators]
    done("sensitivity")
    pairs = []
    for kind, ev, sens, rows, uni in swept:
        found = search_pair(ev, sens, tick)
        pairs.append({
            "model": kind, "sampler": ev.sampler, "steps": ev.steps, "samples": ev.samples, "classifier_accuracy": ev.classifier_accuracy,
            "uniform": {k: v.row() for k, v in uni.items()}, "sweep": rows, "sensitivity": sens.to_dict(), **found,
            "target": target(uni["fp32"], found["searched"]),
        })
    done("search")
    doc = {"steps": steps, "samples": samples, "window": width, "pairs": pairs, "sensitivity": [p["sensitivity"] for p in pairs]}
    with open(os.path.join(out_dir, "adaptive.json"), "w") as f:
        json.dump(doc, f, indent=1, default=float)
    with open(os.path.join(out_dir, "adaptive.md"), "w") as f:
        f.write(markdown(doc))
    for sampler in samplers:
        plot(doc, sampler, os.path.join(out_dir, f"adaptive-{sampler}.png"))
    done("report")
    return doc


def early_late(pair: dict, p: str = "int4") -> tuple[float, float]:
    """Mean PSNR vs FP32 with the first / last 30% of windows quantised alone (higher = less harm)."""
    vals = [row[p]["psnr_db"] for row in pair["sweep"]]
    k = max(1, round(0.3 * len(vals)))
    return float(np.mean(vals[:k])), float(np.mean(vals[-k:]))


def additivity_summary(pair: dict) -> dict:
    pred = np.array([a["predicted_mse"] for a in pair["additivity"]])
    meas = np.array([a["measured_mse"] for a in pair["additivity"]])
    ratio = meas / np.maximum(pred, 1e-12)
    return {"n": len(pred), "ratio_min": float(ratio.min()), "ratio_median": float(np.median(ratio)), "ratio_max": float(ratio.max()),
            "pearson_r": float(np.corrcoef(pred, meas)[0, 1]) if len(pred) > 2 else float("nan")}


def markdown(doc: dict) -> str:
    lines = [f"{doc['samples']} samples per schedule, {doc['steps']} steps, windows of {doc['window']} steps; same noise for every schedule.\n"]
    lines.append("| model | sampler | INT4 early / late (dB) | INT8 early / late (dB) | FP32 FD (other seed) | target schedule | bytes | NN-PSNR loss | FD ratio | met | additive: measured/predicted MSE min/med/max, r |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in doc["pairs"]:
        e4, l4 = early_late(p, "int4")
        e8, l8 = early_late(p, "int8")
        t, a = p["target"], additivity_summary(p)
        fd = p["uniform"]["fp32"]["frechet"]
        tgt = f"{t['name']} | {t['weight_bytes_vs_fp16']:.3f} | {t['nn_psnr_loss_db']:.2f} | {t['frechet_ratio']:.3f} | {t['met']}" if "name" in t else f"{t['why']} | | | | False"
        lines.append(f"| {p['model']} | {p['sampler']} | {e4:.1f} / {l4:.1f} | {e8:.1f} / {l8:.1f} | {fd:.3f} ({p['fp32_frechet_other_seed']:.3f}) | {tgt} | "
                     f"{a['ratio_min']:.2f}/{a['ratio_median']:.2f}/{a['ratio_max']:.2f}, {a['pearson_r']:.3f} |")
    lines.append("\n| model | sampler | schedule | choice per window | PSNR vs FP32 | SSIM | agreement | FD | NN-PSNR | bytes vs FP16 | s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in doc["pairs"]:
        rows = [dict(r, choice="uniform") for r in p["uniform"].values()] + p["searched"] + p["presets"]
        for r in rows:
            choice = r["choice"] if isinstance(r["choice"], str) else "".join({"int4": "4", "int8": "8", "fp16": "h"}[c] for c in r["choice"])
            lines.append(f"| {p['model']} | {p['sampler']} | {r['name']} | {choice} | {r['psnr_db']:.1f} | {r['ssim']:.3f} | {r['class_agreement']:.3f} | "
                         f"{r['frechet']:.3f} | {r['nn_psnr_db']:.2f} | {r['weight_bytes_vs_fp16']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, sampler: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in doc["pairs"] if p["sampler"] == sampler]
    fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(5.5 * (1 + len(pairs)), 4.3))
    q = axes[0]
    for p in pairs:
        pts = sorted(p["searched"], key=lambda s: s["weight_bytes_vs_fp16"])
        q.plot([s["weight_bytes_vs_fp16"] for s in pts], [s["psnr_db"] for s in pts], marker="o", label=f"{p['model']} searched")
        for name, r in p["uniform"].items():
            if name != "fp32":
                q.scatter(r["weight_bytes_vs_fp16"], r["psnr_db"], marker="x")
                q.annotate(f"{p['model']} {name}", (r["weight_bytes_vs_fp16"], r["psnr_db"]), fontsize=7)
    q.axvline(0.4, color="grey", ls=":")
    q.set_xlabel("weight bytes touched / all-FP16")
    q.set_ylabel("PSNR vs FP32 samples (dB)")
    q.set_title(f"{sampler}: quality vs weight bytes")
    q.legend(fontsize=8)
    for ax, p in zip(axes[1:], pairs):
        xs = range(len(p["sweep"]))
        for prec in ("int8", "int4"):
            ax.plot(xs, [row[prec]["psnr_db"] for row in p["sweep"]], marker="o", label=prec.upper())
        ax.set_xticks(list(xs), [row["steps"] for row in p["sweep"]], rotation=45, fontsize=7)
        ax.set_xlabel("window of steps quantised alone (early -> late)")
        ax.set_ylabel("PSNR vs FP32 (dB, higher = less harm)")
        ax.set_title(f"{sampler} on {p['model']}: sensitivity per step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
