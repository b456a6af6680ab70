"""The two ingest paths on one catalog: the library (`ingest_many`, one process) and the
pipeline (`run_dedup` on the local executor), stored bytes and wall time, round-robin runs;
and with --orders, the family ingested in several orders, each through one call and one
model per call, with the reduction on disk (every file of the library) per order.

    python bench/paths.py [--runs 5] [--family family] [--threads 1 2] [--s3]
    python bench/paths.py --orders [--family family] [--index two-level] [--batch-mb 64]
    python bench/paths.py --orders --ladder [--family family] [--index two-level]

Both paths run the same ingest core, so their stored bytes must be equal; the time is from an
opened, empty library to the published models (imports the ingest needs included), one core.
`--threads` adds the library path at each thread count (0, the default: every core); `--s3`
puts the model files on an S3 API server (moto) on loopback and both paths read them from there.
The orders: the catalog's; reversed; the cast (the fp16 re-export) first; the unrelated model
first. Their spread is what the reference rule loses to the order models arrive in. Then the
same with the export made from the fp32 master (as the issue-25 family was), where the order
decides whether the fine-tunes can reference their base. `--index` and `--batch-mb` set the
libraries' index layout and commit size (the "two-level" layout's shard size). `--ladder`: the
orders of the family base's GGUF quantization ladder (haagenti.exports.export_ladder) instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager

from common import CACHE, example_family, master_export

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary, ModelInput
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor

CONFIG = LibraryConfig()  # of every library built (main sets --index and --batch-mb)


def library(threads: int):
    def ingest(root: str, members, catalog: str) -> None:
        FragmentLibrary.open(root, CONFIG).ingest_many([ModelInput([m.file], m.model_id, m.family) for m in members], threads=threads)

    return ingest


def pipeline(root: str, members, catalog: str) -> None:
    run_dedup(catalog, root, LocalExecutor(), CONFIG)


def one_by_one(root: str, members) -> None:
    for m in members:
        FragmentLibrary.open(root, CONFIG).ingest_many([ModelInput([m.file], m.model_id, m.family)])


def disk_bytes(root: str) -> int:
    """Bytes of every file under `root` (du -b without the directories' own entries)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def orders(members) -> dict[str, list]:
    if members[0].family == "ladder":  # F16 first, then each quantized step; quantized before F16
        return {"F16 first": list(members), "reversed": list(reversed(members)), "F16 last": members[1:] + members[:1]}
    cast = [m for m in members if "fp16" in m.model_id]
    unrelated = [m for m in members if m.family is None]
    return {
        "catalog": list(members),
        "reversed": list(reversed(members)),
        "cast first": cast + [m for m in members if m not in cast],
        "unrelated first": unrelated + [m for m in members if m not in unrelated],
    }


def bench_orders(members, title: str) -> None:
    raw = sum(os.path.getsize(m.file) for m in members)
    print(f"{title}: {len(members)} models, {raw:,} B raw; reduction on disk = 1 - (bytes of the library's files) / raw; "
          "stored: the fragments' stored bytes (the references found, without the index)")
    print(f"{'order':18s} {'one call':>10s} {'one by one':>11s} {'stored, one call':>17s} {'stored, one by one':>19s}")
    got: dict[str, list[float]] = {}
    stored: dict[str, list[int]] = {}
    for name, ms in orders(members).items():
        for way in (lambda r: library(0)(r, ms, ""), lambda r: one_by_one(r, ms)):
            root = tempfile.mkdtemp(prefix="haagenti-orders-")
            try:
                way(os.path.join(root, "lib"))
                got.setdefault(name, []).append(1 - disk_bytes(os.path.join(root, "lib")) / raw)
                stored.setdefault(name, []).append(FragmentLibrary.open(os.path.join(root, "lib"), create=False).stats().stored_bytes)
            finally:
                shutil.rmtree(root)
        print(f"{name:18s} {got[name][0]:10.2%} {got[name][1]:11.2%} {stored[name][0]:17,d} {stored[name][1]:19,d}")
    for i, way in enumerate(("one call", "one by one")):
        vals = [v[i] for v in got.values()]
        print(f"spread ({way}): {100 * (max(vals) - min(vals)):.2f} points (best {max(vals):.2%}, worst {min(vals):.2%})")


def ladder(base) -> list:
    """The GGUF quantization ladder of `base`, written once next to its family."""
    from haagenti.examples import FamilyMember
    from haagenti.exports import LADDER, export_ladder

    folder = os.path.join(os.path.dirname(base.file), "ladder")
    name = os.path.basename(base.file).removesuffix(".safetensors")
    files = [os.path.join(folder, f"{name}-{q}.gguf") for q in LADDER]
    if not all(os.path.exists(f) for f in files):
        files = export_ladder(base.file, folder)
    return [FamilyMember(f"{base.model_id}-{q}", f, "ladder", "") for q, f in zip(LADDER, files)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--family", default="family")
    ap.add_argument("--orders", action="store_true", help="reduction on disk per ingest order instead of the two paths' times")
    ap.add_argument("--index", default="bands", help="index layout of the libraries")
    ap.add_argument("--batch-mb", type=float, default=64, help="MiB per encode batch and fragments commit")
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="thread counts of the library path (0: every core)")
    ap.add_argument("--s3", action="store_true", help="read the model files from an S3 API server (moto) on loopback")
    ap.add_argument("--ladder", action="store_true", help="with --orders: the family base's GGUF quantization ladder")
    args = ap.parse_args()
    global CONFIG
    CONFIG = LibraryConfig(index=args.index, batch_bytes=int(args.batch_mb * 1024 * 1024))
    members = example_family(args.family)
    if args.orders and args.ladder:
        bench_orders(ladder(members[0]), f"{args.family} base's GGUF ladder")
        return
    if args.orders:
        bench_orders(members, args.family)
        bench_orders(master_export(members), f"{args.family}, its fp16 export made from the fp32 master (common.master_export)")
        return
    catalog = os.path.join(CACHE, args.family, "catalog.yaml")
    if args.s3:
        with on_s3(members) as (members, catalog):
            bench_paths(members, catalog, args)
    else:
        bench_paths(members, catalog, args)


@contextmanager
def on_s3(members):
    """The members' files on a moto S3 server of this run, and a catalog naming them there."""
    import boto3
    import yaml

    from haagenti.testing import s3_environment, start_s3_server

    proc, endpoint = start_s3_server()
    os.environ.update(s3_environment(endpoint))
    folder = tempfile.mkdtemp(prefix="haagenti-paths-s3-")
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="models")
        moved = []
        for m in members:
            s3.upload_file(m.file, "models", os.path.basename(m.file))
            moved.append(dataclasses.replace(m, file=f"s3://models/{os.path.basename(m.file)}"))
        catalog = os.path.join(folder, "catalog.yaml")
        with open(catalog, "w") as f:
            yaml.safe_dump({"models": [{"id": m.model_id, "family": m.family, "files": [m.file]} for m in moved]}, f, sort_keys=False)
        yield moved, catalog
    finally:
        shutil.rmtree(folder)
        proc.terminate()
        proc.wait(10)


def bench_paths(members, catalog: str, args) -> None:
    gc.freeze()
    paths = {f"ingest_many (library, threads={n})": library(n) for n in args.threads}
    paths["run_dedup (local executor)"] = pipeline
    times: dict[str, list[float]] = {name: [] for name in paths}
    stored: dict[str, int] = {}
    raw = 0
    for _ in range(args.runs):
        for name, fn in paths.items():
            root = tempfile.mkdtemp(prefix="haagenti-paths-")
            try:
                t = time.perf_counter()
                fn(os.path.join(root, "lib"), members, catalog)
                times[name].append(time.perf_counter() - t)
                s = FragmentLibrary.open(os.path.join(root, "lib"), create=False).stats()
                stored[name], raw = s.stored_bytes, s.raw_bytes
            finally:
                shutil.rmtree(root)
    where = "model files on S3 (moto, loopback)" if args.s3 else "model files local"
    print(f"{args.family}: {len(members)} models, {raw:,} B raw, {where}; {args.runs} runs each, round-robin")
    print(f"{'path':36s} {'stored B':>12s} {'saved':>8s} {'min s':>7s} {'median s':>9s} {'max s':>7s}")
    for name, ts in times.items():
        print(f"{name:36s} {stored[name]:12,d} {1 - stored[name] / raw:8.3%} {min(ts):7.2f} {statistics.median(ts):9.2f} {max(ts):7.2f}")


if __name__ == "__main__":
    main()
