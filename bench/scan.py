"""The dedup pipeline's scan on a catalog of many small models: a full scan (every byte of every
file hashed, as with --rehash) against the changed-only scan of an unchanged catalog (stamps
only), on a local disk and on moto's S3 server on loopback (decisions/0271).

    python bench/scan.py --models 2000 --size 16384 --size 262144 [--s3]
    python bench/scan.py --rerun --models 2000 --size 262144   # run_dedup of an unchanged catalog
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from functools import partial

from haagenti.config import LibraryConfig
from pipelines.executors import LocalExecutor
from pipelines.steps import scan_model


def safetensors_bytes(size: int) -> bytes:
    """One F16 tensor of `size` random bytes, as a safetensors file."""
    header = json.dumps({"w": {"dtype": "F16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + os.urandom(size)


def make_catalog(root: str, models: int, size: int, put=None) -> list[dict]:
    """`models` model files under `root` (a local folder, or an S3 prefix written by `put`)."""
    rows = []
    for i in range(models):
        name = f"m{i:06d}.safetensors"
        data = safetensors_bytes(size)
        if put is None:
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        else:
            put(f"{root}/{name}", data)
        rows.append({"model_id": f"m{i:06d}", "files": [f"{root}/{name}"], "family": None, "revision": None, "rank": i})
    if put is None:  # as a catalog fetched a while ago: past the stamps' settling time
        old = time.time() - 60
        for name in os.listdir(root):
            os.utime(os.path.join(root, name), (old, old))
    return rows


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench(rows: list[dict], size: int, where: str, lib_url: str, repeat: int) -> dict:
    from pipelines.stamps import read_stamps, write_stamps

    ex = LocalExecutor()
    scan = partial(scan_model, fragment_elements=LibraryConfig().fragment_elements)
    first = ex.map(scan, rows)
    stamped = [dict(r, known=s["stamps"], stored_hash=s["content_hash"]) for r, s in zip(rows, first)]
    full = timed(lambda: ex.map(scan, rows), repeat)
    changed_only = timed(lambda: ex.map(scan, stamped), repeat)
    assert all(s["file_records"] is None for s in ex.map(scan, stamped)), "a stamped model was read"
    stamps = {s["model_id"]: s["stamps"] for s in first}
    keep = timed(lambda: (write_stamps(lib_url, stamps), read_stamps(lib_url)), repeat)
    n = len(rows)

    def fig(xs: list[float]) -> dict:
        return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3), "per_model_ms": round(1000 * min(xs) / n, 3)}

    return {"where": where, "models": n, "file_bytes": size, "full_scan_s": fig(full), "changed_only_scan_s": fig(changed_only),
            "stamps_write_read_s": fig(keep), "full_scan_MB_per_s": round(n * size / min(full) / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2000)
    ap.add_argument("--size", type=int, action="append", help="bytes of tensor data per model file (repeatable)")
    ap.add_argument("--s3", action="store_true", help="also on moto's S3 server on loopback")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rerun", action="store_true", help="time whole re-runs of jobs' run_dedup on an unchanged local catalog instead")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="haagenti-scan-bench-")
    os.makedirs(os.path.join(work, "lib"))
    try:
        if args.rerun:
            print(json.dumps(rerun(work, args.models, (args.size or [16384])[0], args.repeat)), flush=True)
            return
        for size in args.size or [16384]:
            folder = os.path.join(work, f"models-{size}")
            os.makedirs(folder)
            rows = make_catalog(folder, args.models, size)
            print(json.dumps(bench(rows, size, "local", os.path.join(work, "lib"), args.repeat)), flush=True)
            shutil.rmtree(folder)
            if args.s3:
                print(json.dumps(s3_bench(args.models, size, args.repeat)), flush=True)
    finally:
        shutil.rmtree(work)


def rerun(work: str, models: int, size: int, repeat: int) -> dict:
    """A catalog deduplicated once, then re-run unchanged: the re-runs' wall time and scan stage
    (runs on the code on PYTHONPATH, so the same command times an older checkout)."""
    import yaml

    from haagenti.config import LibraryConfig
    from pipelines.dedup import run_dedup

    folder = os.path.join(work, "models")
    os.makedirs(folder)
    rows = make_catalog(folder, models, size)
    cat = os.path.join(work, "catalog.yaml")
    with open(cat, "w") as f:
        yaml.safe_dump({"models": [{"id": r["model_id"], "files": r["files"]} for r in rows]}, f)
    lib = os.path.join(work, "rerun-lib")
    config = LibraryConfig(fragment_size=64 * 1024, similarity=False)
    t = time.perf_counter()
    run_dedup(cat, lib, LocalExecutor(), config)
    first = time.perf_counter() - t
    walls, scans = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        r = run_dedup(cat, lib, LocalExecutor(), config)
        walls.append(time.perf_counter() - t)
        scans.append(r.stages["scan"])
        assert r.nothing_to_do
    return {"rerun_models": models, "file_bytes": size, "first_run_s": round(first, 1),
            "rerun_wall_s": [round(min(walls), 3), round(statistics.median(walls), 3), round(max(walls), 3)],
            "rerun_scan_stage_s": [round(min(scans), 3), round(statistics.median(scans), 3), round(max(scans), 3)]}


def s3_bench(models: int, size: int, repeat: int) -> dict:
    import boto3

    from haagenti.fsio import filesystem_for
    from haagenti.testing import s3_environment, start_s3_server

    proc, endpoint = start_s3_server()
    try:
        os.environ.update(s3_environment(endpoint))
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="scan")
        rows = make_catalog("s3://scan/models", models, size, put=lambda url, data: client.put_object(Bucket="scan", Key=url[len("s3://scan/"):], Body=data))
        filesystem_for("s3://scan")[0].invalidate_cache()
        return bench(rows, size, "s3 (moto, loopback)", "s3://scan/lib", repeat)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
