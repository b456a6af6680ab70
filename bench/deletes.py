"""gc's deletes when every data file is partly dead: peak RSS and time of the per-file rewrite
(`LibraryStore.delete_where`, what gc uses) against delta-rs' `DeltaTable.delete` with
`fragment_id IN (...)` predicates of 500 ids (what gc used before), on the same bytes.

For each size (GB of raw bf16 model bytes, one normal(0, 0.02) model: plain fragments in
~90 MB files) it ingests the model once, then per run and method copies the library and deletes
every other fragment in a fresh subprocess (its VmHWM is the peak), methods interleaved.

    flock /tmp/haagenti-heavy.lock .venv/bin/python bench/deletes.py --sizes 0.25,1 --runs 3

Generated files live under bench/.cache/deletes and are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maintenance import CACHE, _vmhwm_mb, entrypoint, generate, ingest, measure, size_folders, summary  # noqa: E402

METHODS = ("delta-rs delete", "delete_where")


def worker(method: str, lib: str) -> None:
    import pyarrow as pa

    from haagenti.store.delta import LibraryStore

    store = LibraryStore(lib)
    ids = store.read("fragments", columns=["fragment_id"])["fragment_id"].to_pylist()[::2]
    start = _vmhwm_mb()
    t = time.perf_counter()
    if method == "delete_where":
        n = store.delete_where("fragments", "fragment_id", pa.array(ids, pa.string()))
    else:
        n = sum(store.delete("fragments", "fragment_id IN (" + ", ".join(f"'{v}'" for v in ids[i : i + 500]) + ")") for i in range(0, len(ids), 500))
    if n != len(ids):
        raise SystemExit(f"{method} deleted {n} rows, not {len(ids)}")
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": _vmhwm_mb(), "start_mb": start, "deleted": n}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.25,1", help="GB of raw model bytes per library, comma-separated")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base_dir = os.path.join(CACHE, "deletes")
    rows = []
    try:
        for size, folder in size_folders(base_dir, args.sizes):
            lib, work = os.path.join(folder, "lib"), os.path.join(folder, "work")
            paths = generate(folder, size, scale=1.0)
            ingest(lib, paths[:1])
            for p in paths:
                os.remove(p)
            stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(lib, "fragments")) for f in fs)
            print(f"\n{size:g} GB raw: {stored / 1e6:.0f} MB of fragments files", flush=True)
            res: dict[str, list[dict]] = {m: [] for m in METHODS}
            for i in range(args.runs):
                for m in METHODS:
                    shutil.copytree(lib, work)
                    try:
                        res[m].append(measure(m, work, __file__))
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                print(f"  run {i + 1}: " + ", ".join(f"{m} {v[-1]['seconds']:.1f} s / {v[-1]['peak_mb']:.0f} MB" for m, v in res.items()), flush=True)
            for m, rs in res.items():
                rows.append((size, m, len(rs), [r["peak_mb"] for r in rs], [r["seconds"] for r in rs], rs[0]["deleted"], rs[0]["start_mb"]))
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    print("\nsize GB  method            runs  peak RSS MB (min med max)   seconds (min med max)     rows deleted  RSS after open MB")
    for size, m, n, peaks, secs, deleted, start in rows:
        print(f"{size:7g}  {m:16s} {n:4d}  {summary(peaks)}   {summary(secs)}   {deleted:12d}  {start:8.0f}")


if __name__ == "__main__":
    entrypoint(main, worker)
