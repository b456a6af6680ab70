"""A lineage stored through a reference chain, and what restoring its end costs.

    flock /tmp/haagenti-heavy.lock python bench/chains.py [--mb 100] [--runs 5]

A: an fp16 export of a generated model (bench/large_models.py); B: a bf16 fine-tune of it
(A + noise, stored as a delta of A's cast); C: a bf16 fine-tune of B (B + a tenth of that noise).
Each is ingested by its own call. With chains C is a delta of B (depth 2); with one hop it could
only be a delta of A. Prints each model's reduction, the depths of C's fragments, and restoring C
at one thread: wall MB/s (min / median / max over --runs) and the process's CPU seconds, which
the machine's other load disturbs less.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from large_models import write_model

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary


def lineage(folder: str, mb: int) -> list[str]:
    a = write_model(os.path.join(folder, "a.safetensors"), mb * 1_000_000, "fp16")
    g = torch.Generator().manual_seed(1)
    b = {k: (v.float() + 0.003 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in load_file(a).items()}
    save_file(b, os.path.join(folder, "b.safetensors"))
    c = {k: (v.float() + 0.0005 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in b.items()}
    save_file(c, os.path.join(folder, "c.safetensors"))
    return [a, os.path.join(folder, "b.safetensors"), os.path.join(folder, "c.safetensors")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100, help="size of the generated fp16 model")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="haagenti-chains-")
    try:
        files = lineage(root, args.mb)
        lib = FragmentLibrary.open(os.path.join(root, "lib"), LibraryConfig())
        for name, path in zip("abc", files):
            r = lib.ingest([path], name)
            print(f"{name}: {r.raw_bytes / 1e6:.0f} MB, {r.reduction:.1%} saved, {r.delta} deltas of {r.fragments} fragments")
        frags = lib.store.read("fragments", columns=["fragment_id", "depth"])
        depth = dict(zip(frags["fragment_id"].to_pylist(), frags["depth"].to_pylist()))
        ids = lib.manifest("c").fragment_ids
        print("depths of c's fragments:", {d: sum(1 for i in ids if depth[i] == d) for d in sorted(set(depth[i] for i in ids))})
        size = os.path.getsize(files[2])
        walls, cpus = [], []
        for k in range(args.runs):
            out = os.path.join(root, f"out{k}")
            t, c = time.perf_counter(), time.process_time()
            lib.restore("c", out, threads=1)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
            shutil.rmtree(out)
        print(f"restore c, --threads 1, {args.runs} runs: MB/s {size / max(walls) / 1e6:.1f} / {size / statistics.median(walls) / 1e6:.1f} / "
              f"{size / min(walls) / 1e6:.1f} (min / median / max); CPU {statistics.median(cpus):.2f} s median; load {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
