"""Compact the library's index tables (bands, ids).

    ray job submit --working-dir . -- python -m jobs.compact --library s3://b/lib
Each ingest appends one sorted file per index partition; this rewrites every partition sorted
by its key into files with disjoint key ranges, so a lookup opens one file per key range
again. It deletes nothing (the files it replaces stay until gc vacuums them), so ingests may
run beside it: Delta lets a blind append and a rewrite commit in either order. A scheduled
re-dedup runs it after its ingests; `jobs.gc` runs it too.
"""
from __future__ import annotations

import argparse
import sys
import time

from haagenti.errors import HaagentiError
from haagenti.index import compact
from haagenti.library import FragmentLibrary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.compact")
    ap.add_argument("--library", required=True)
    ap.add_argument("--target-mb", type=int, default=256, help="index data file size to aim for")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    try:
        lib = FragmentLibrary.open(args.library, create=False)
        files = compact(lib.store, args.target_mb * 1024 * 1024)
    except HaagentiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"compact: {files} index files rewritten in {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
