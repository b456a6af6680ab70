"""Compact the library's index tables (IndexLayout.compact; the "bands" layout's: bands, ids).

    ray job submit --working-dir . -- python -m jobs.compact --library s3://b/lib
Each ingest appends one sorted file per index partition; this rewrites every partition sorted
by its key into files with disjoint key ranges, so a lookup opens one file per key range
again. It holds the gc lease, as gc does: Delta settles a blind append against a rewrite, but
two rewrites of the same files (gc's deletes, another compact) make one commit fail halfway
through the job. Refused (one line) while another writer holds the library, unless --wait
outlasts it. A scheduled re-dedup runs it after its ingests; `jobs.gc` runs it too.
"""
from __future__ import annotations

import argparse
import sys
import time

from haagenti.library import FragmentLibrary
from jobs import exclusive_job


def rewrite(lib: FragmentLibrary, args: argparse.Namespace) -> str:
    t = time.perf_counter()
    files = lib.index.compact(args.target_mb * 1024 * 1024)
    if not files:
        return "compact: nothing to do (nothing was added or removed since the index was last sorted)"
    return f"compact: {files} index files rewritten in {time.perf_counter() - t:.1f}s"


def main(argv: list[str] | None = None) -> int:
    return exclusive_job("jobs.compact", argv, rewrite, lambda ap: ap.add_argument("--target-mb", type=int, default=256, help="index data file size to aim for"))


if __name__ == "__main__":
    sys.exit(main())
