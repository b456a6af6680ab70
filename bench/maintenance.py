"""Maintenance in bounded memory: peak RSS and throughput of `verify` and `gc` as the library grows.

For each size (GB of raw model bytes) it generates three bf16/fp16 models with trained-like
statistics (a normal(0, 0.02) bf16 base, a fine-tune = base + small noise, and that fine-tune
cast to fp16: the deltas a catalog is made of), ingests them with similarity (deltas against
the base, so verify exercises its reference path), then measures, each in a fresh subprocess
(its VmHWM is the peak of the process doing the work):
  verify   the whole library (every stored fragment, then every model's files re-hashed)
  gc       after a scratch fine-tune (a tenth of the size) is ingested and removed, so every
           gc run has the same garbage to collect; its reachability scan covers the library
  gc job   the same garbage again, collected by `python -m jobs.gc` (gc, then the index tables
           z-ordered and the metadata tables compacted, under one lease)
  baseline verify   the verify this replaced (every fragment decoded into one dict, then each
           model re-hashed), up to --baseline GB: it needs ~1.5x the library's raw size in RAM
Prints min/median/max over the runs.

    flock /tmp/haagenti-heavy.lock .venv/bin/python bench/maintenance.py --sizes 0.5,2,8 --runs 3 --runs-large 3

Generated files live under bench/.cache/maintenance and are deleted at the end (--keep keeps them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("HAAGENTI_BENCH_CACHE", os.path.join(ROOT, "bench", ".cache"))  # as bench/common.py
TENSOR = (2048, 4096)  # 16 MiB in bf16
NOISE = 1e-4  # fine-tune noise: a few bf16 ulps of a 0.02-scale weight


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---- generation ----------------------------------------------------------------------------
def _header(names: list[str], dtype: str) -> bytes:
    size = TENSOR[0] * TENSOR[1] * 2
    h = {n: {"dtype": dtype, "shape": list(TENSOR), "data_offsets": [i * size, (i + 1) * size]} for i, n in enumerate(names)}
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def generate(folder: str, raw_gb: float, prefix: str = "", scale: float = 1 / 3, noise_seed: int = 1) -> list[str]:
    """base (bf16), ft = base + noise (bf16), ft cast to fp16, streamed tensor by tensor;
    `scale` of `raw_gb` each. The base is the same for every call (its first tensors are
    shared); the noise comes from `noise_seed`. Returns the three paths."""
    import torch

    per_model = raw_gb * 1e9 * scale
    n = max(1, round(per_model / (TENSOR[0] * TENSOR[1] * 2)))
    names = [f"layers.{i}.mlp.weight" for i in range(n)]
    paths = [os.path.join(folder, f"{prefix}{m}.safetensors") for m in ("base", "ft", "ft-fp16")]
    g, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(noise_seed)
    files = [open(p, "wb") for p in paths]
    try:
        for f, dt in zip(files, ("BF16", "BF16", "F16")):
            f.write(_header(names, dt))
        for _ in names:
            w = torch.randn(TENSOR, generator=g) * 0.02
            base = w.bfloat16()
            ft = (base.float() + torch.randn(TENSOR, generator=noise) * NOISE).bfloat16()
            for f, t in zip(files, (base, ft, ft.half())):
                f.write(t.view(torch.int16).numpy().tobytes())
    finally:
        for f in files:
            f.close()
    return paths


# ---- measured work, in a subprocess ---------------------------------------------------------
def worker(op: str, lib_url: str) -> None:
    from haagenti.library import FragmentLibrary

    lib = FragmentLibrary.open(lib_url, create=False)
    start_rss = _vmhwm_mb()
    t = time.perf_counter()
    if op == "verify":
        r = lib.verify()
        out = {"ok": r.ok, "fragments": r.fragments_checked, "errors": r.errors[:3]}
    elif op == "baseline-verify":
        out = {"ok": True, "fragments": baseline_verify(lib), "errors": []}
    elif op == "gc":
        out = lib.gc()
    elif op == "gc-job":
        from jobs.gc import main as gc_job

        out = {"rc": gc_job(["--library", lib_url])}
    else:
        raise SystemExit(f"unknown op {op}")
    out.update(seconds=time.perf_counter() - t, peak_mb=_vmhwm_mb(), start_mb=start_rss)
    print(json.dumps(out))


def baseline_verify(lib) -> int:
    """The verify this replaced (git 7e67e19), on today's primitives: every fragment decoded
    into one dict (`fetch_raw(known_fragments())`), then each model re-hashed as a restore."""
    from haagenti.restore import write_model

    n = len(lib.fetch_raw(lib.known_fragments()))
    for m in lib.models():
        manifest = lib.manifest(m["model_id"])
        write_model(lib, manifest, [_Discard() for _ in manifest.files], rehash=True)
    return n


class _Discard:
    def write(self, b) -> int:
        return len(b)


def measure(op: str, lib: str, script: str = __file__) -> dict:
    """`op` on `lib` in a fresh subprocess of `script` (its VmHWM is the work's peak): the
    JSON of its last line."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.abspath(script), "--worker", op, lib], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{op} worker failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def ingest(lib: str, paths: list[str]) -> None:
    """`haagenti ingest --each` (ids are the file stems), with similarity: deltas against the base."""
    subprocess.run([sys.executable, "-m", "haagenti.cli", "ingest", lib, *paths, "--each", "--family", "bench"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))


def rm(lib: str, model: str) -> None:
    subprocess.run([sys.executable, "-m", "haagenti.cli", "rm", lib, model], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))


def library_size(lib: str) -> tuple[int, int, int, int]:
    """(raw bytes, stored bytes, fragments, delta fragments) from `haagenti stats --json`."""
    p = subprocess.run([sys.executable, "-m", "haagenti.cli", "stats", lib, "--json"], check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    s = json.loads(p.stdout)
    return s["raw_bytes"], s["stored_bytes"], s["fragments"], s["delta_fragments"]


def size_folders(base_dir: str, sizes: str) -> Iterator[tuple[float, str]]:
    """(size, a new empty folder for it) for each of the comma-separated sizes (GB)."""
    for size in (float(s) for s in sizes.split(",")):
        folder = os.path.join(base_dir, f"{size:g}gb")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        yield size, folder


def summary(values: list[float]) -> str:
    return f"{min(values):8.1f} {statistics.median(values):8.1f} {max(values):8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5,2,8", help="GB of raw model bytes per library, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="runs per measure at sizes below 8 GB")
    ap.add_argument("--runs-large", type=int, default=3, help="runs per measure at 8 GB and above")
    ap.add_argument("--baseline", type=float, default=2, help="also run the replaced verify at sizes up to this many GB (0: never)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and libraries")
    args = ap.parse_args()
    base_dir = os.path.join(CACHE, "maintenance")
    rows = []
    try:
        for size, folder in size_folders(base_dir, args.sizes):
            lib = os.path.join(folder, "lib")
            t = time.perf_counter()
            paths = generate(folder, size)
            gen_s = time.perf_counter() - t
            t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            ingest(lib, paths)
            ing_s = time.perf_counter() - t
            ing_cpu = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) - getattr(cpu, k) for k in ("ru_utime", "ru_stime"))
            # Garbage for gc: another fine-tune of the base's first tensors (deltas against it).
            scratch = generate(folder, size, "scratch-", scale=0.1, noise_seed=2)[1]
            for p in paths:
                os.remove(p)  # the library holds them now: free the disk
            raw, stored, frags, deltas = library_size(lib)
            print(f"\n{size:g} GB: {raw / 1e9:.2f} GB raw, {stored / 1e9:.2f} GB stored, {frags} fragments "
                  f"({deltas} delta); generated in {gen_s:.0f} s, ingested in {ing_s:.0f} s ({ing_cpu:.0f} s CPU)", flush=True)
            runs = args.runs if size < 8 else args.runs_large
            res: dict[str, list[dict]] = {"verify": [], "gc": [], "gc job": [], "baseline verify": []}
            for i in range(runs):
                r = measure("verify", lib)
                if not r["ok"]:
                    raise RuntimeError(f"verify failed: {r['errors']}")
                res["verify"].append(r)
                ingest(lib, [scratch])
                rm(lib, "scratch-ft")
                r = measure("gc", lib)
                if not r["fragments_removed"]:
                    raise RuntimeError("gc found no garbage to collect")
                res["gc"].append(r)
                ingest(lib, [scratch])
                rm(lib, "scratch-ft")
                r = measure("gc-job", lib)
                if r["rc"] != 0:
                    raise RuntimeError("python -m jobs.gc failed")
                res["gc job"].append(r)
                if args.baseline and size <= args.baseline:
                    res["baseline verify"].append(measure("baseline-verify", lib))
                print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s / {v[-1]['peak_mb']:.0f} MB" for k, v in res.items() if v), flush=True)
            for op, rs in res.items():
                if rs:
                    rows.append((size, op, len(rs), [r["peak_mb"] for r in rs], [raw / r["seconds"] / 1e6 for r in rs], [r["seconds"] for r in rs], rs[0]["start_mb"]))
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base_dir, ignore_errors=True)
    print("\nsize GB  op               runs  peak RSS MB (min med max)   raw MB/s (min med max)     seconds (min med max)     RSS after open MB")
    for size, op, n, peaks, rates, secs, start in rows:
        print(f"{size:7g}  {op:16s} {n:4d}  {summary(peaks)}   {summary(rates)}   {summary(secs)}   {start:8.0f}")


def entrypoint(main, worker) -> None:
    """`SCRIPT --worker OP LIB` runs one measured operation (see `measure`); anything else the bench."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()


if __name__ == "__main__":
    entrypoint(main, worker)
