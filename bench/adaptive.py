"""Adaptive precision, measured: presets, the seed's early-low-precision schedule, the per-step
sensitivity sweep and the search for a schedule at <= 50% of all-FP16 weight bytes.

    python bench/adaptive.py [--steps 30] [--samples 512]
Writes bench/.cache/adaptive/adaptive.{md,json,png}; trains the DDPM on first use (~1 min).
"""
from __future__ import annotations

import argparse
import os

import torch

from common import CACHE

from haagenti.adaptive.evaluate import ScheduleResult
from haagenti.adaptive.report import evaluate_all, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    doc = evaluate_all(os.path.join(CACHE, "adaptive"), args.steps, args.samples)
    print(f"DDIM {args.steps} steps, {args.samples} samples, same noise for every schedule; 1 thread\n")
    print(table([ScheduleResult(**r) for r in doc["presets"] + doc["target_search"]]))
    print("sensitivity (one window quantised, rest FP32; PSNR vs FP32, dB):")
    for row in doc["sensitivity"]:
        print(f"  steps {row['steps']:>6s}: INT8 {row['int8_psnr_db']:6.1f}  INT4 {row['int4_psnr_db']:6.1f}  (agreement {row['int8_agreement']:.3f} / {row['int4_agreement']:.3f})")
    print("measured quality factors (class agreement, all steps at that precision):", {k: round(v, 3) for k, v in doc["quality_factors"].items()})
    t = doc["target"]
    print(f"target schedule: {t['name']} touches {t['weight_bytes_vs_fp16']:.1%} of FP16 weight bytes, NN-PSNR {t['nn_psnr_db']:.2f} dB" if t else "no schedule met the target")


if __name__ == "__main__":
    main()
