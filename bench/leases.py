"""What the many-writers rule costs one ingest, on a local folder and on S3 (moto on loopback):
a lease taken and released (two lease writes, two listings, one delete) and a publication
record (one listing, one write, one delete), beside a whole small ingest that pays them.
Methods are sampled round-robin so they share the same minutes of a shared machine.

    python bench/leases.py [--runs 15]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haagenti.config import LibraryConfig  # noqa: E402
from haagenti.library import FragmentLibrary  # noqa: E402
from haagenti.store.leases import writing  # noqa: E402
from haagenti.store.publication import record  # noqa: E402

from common import start_moto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-leases-")
    server, _ = start_moto("bench")
    try:
        rng = np.random.default_rng(0)
        path = os.path.join(tmp, "m.safetensors")
        save_file({f"w{i}": rng.standard_normal((64, 512)).astype(np.float16) for i in range(4)}, path)
        config = LibraryConfig(fragment_size=65536, similarity=False)
        libs = {"local": FragmentLibrary.open(os.path.join(tmp, "lib"), config), "s3": FragmentLibrary.open("s3://bench/lib", config)}
        # Records of made-up versions go to libraries of their own (a real one would refuse them).
        scratch = {"local": FragmentLibrary.open(os.path.join(tmp, "scratch"), config), "s3": FragmentLibrary.open("s3://bench/scratch", config)}
        times: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs):
            for where, lib in libs.items():
                t0 = time.perf_counter()
                with writing(lib.store, "ingest", [f"x{run}"]):
                    pass
                t1 = time.perf_counter()
                record(scratch[where].store, run, [f"x{run}"])
                t2 = time.perf_counter()
                lib.ingest([path], f"m{run}")
                t3 = time.perf_counter()
                for name, dt in (("lease", t1 - t0), ("record", t2 - t1), ("ingest", t3 - t2)):
                    times.setdefault((where, name), []).append(dt * 1000)
        print(f"{args.runs} runs each, round-robin; a 262 KB model of 4 fragments, no similarity (machine shared)")
        print(f"{'':8s}{'what':34s}{'min':>9s}{'median':>9s}{'max':>9s}  ms")
        labels = {"lease": "lease taken and released", "record": "publication record", "ingest": "whole ingest (pays both)"}
        for (where, name), xs in times.items():
            print(f"{where:8s}{labels[name]:34s}{min(xs):9.1f}{statistics.median(xs):9.1f}{max(xs):9.1f}")
    finally:
        server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
