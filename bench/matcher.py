"""The reference matcher alone against a library's index: batches of 256 random signatures
(like those of a bf16 model's fragments) through `RunMatcher` + the index layout's `propose`, in one process.

    flock /tmp/haagenti-heavy.lock python bench/matcher.py LIBRARY [--batches 8] [--profile]

Prints seconds per batch (min/median/max; the first batch also parses every band file's
footer), seconds in the index lookup, rows read per batch and the process's peak RSS. LIBRARY:
e.g. one kept by `bench/scale.py --keep` (bench/.cache/scale/lib-N).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import time

import numpy as np
import pyarrow as pa

from haagenti.library import FragmentLibrary
from haagenti.matching import RunMatcher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("library")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    lib = FragmentLibrary.open(a.library)
    index = lib.index
    spent, rows = [0.0], [0]

    def lookup(buckets: pa.Table) -> pa.Table:
        t = time.perf_counter()
        got = index.propose(buckets)
        spent[0] += time.perf_counter() - t
        rows[0] += got.num_rows
        return got

    matcher = RunMatcher(lib.config, lookup)
    rng = np.random.default_rng(5)
    batches = [pa.table({
        "fragment_id": [rng.bytes(32).hex() for _ in range(256)],
        "bits": pa.array([rng.bytes(lib.config.signature.bits // 8) for _ in range(256)], pa.binary()),
        "n_elements": pa.array(np.full(256, 131072), pa.int64()),
    }) for _ in range(a.batches)]
    prof = cProfile.Profile() if a.profile else None
    times = []
    for b in batches:
        if prof:
            prof.enable()
        t = time.perf_counter()
        matcher.match(b)
        times.append(time.perf_counter() - t)
        if prof:
            prof.disable()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"seconds per batch: {min(times):.3f} / {np.median(times):.3f} / {max(times):.3f} (first {times[0]:.3f}), total {sum(times):.2f}; "
          f"lookup {spent[0]:.2f} s, {rows[0] / a.batches:,.0f} library rows per batch; peak {peak} MiB")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
