"""The two ingest paths on one catalog: the library (`ingest_many`, one process) and the
pipeline (`run_dedup` on the local executor), stored bytes and wall time, round-robin runs.

    python bench/paths.py [--runs 5] [--family family]

Both paths run the same ingest core, so their stored bytes must be equal; the time is from an
opened, empty library to the published models (imports the ingest needs included), one core.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time

from common import CACHE, example_family

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary, ModelInput
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor


def library(root: str, members, catalog: str) -> None:
    FragmentLibrary.open(root, LibraryConfig()).ingest_many([ModelInput([m.file], m.model_id, m.family) for m in members])


def pipeline(root: str, members, catalog: str) -> None:
    run_dedup(catalog, root, LocalExecutor(), LibraryConfig())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--family", default="family")
    args = ap.parse_args()
    members = example_family(args.family)
    catalog = os.path.join(CACHE, args.family, "catalog.yaml")
    gc.freeze()
    paths = {"ingest_many (library)": library, "run_dedup (local executor)": pipeline}
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
    print(f"{args.family}: {len(members)} models, {raw:,} B raw; {args.runs} runs each, round-robin")
    print(f"{'path':28s} {'stored B':>12s} {'saved':>8s} {'min s':>7s} {'median s':>9s} {'max s':>7s}")
    for name, ts in times.items():
        print(f"{name:28s} {stored[name]:12,d} {1 - stored[name] / raw:8.3%} {min(ts):7.2f} {statistics.median(ts):9.2f} {max(ts):7.2f}")


if __name__ == "__main__":
    main()
