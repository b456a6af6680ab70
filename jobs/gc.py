"""Collect unreferenced fragments and compact the library's tables.

    ray job submit --working-dir . -- python -m jobs.gc --library s3://b/lib
Refused (one line) while another writer holds the library, unless --wait outlasts it.
"""
from __future__ import annotations

import argparse
import sys

from haagenti.errors import HaagentiError
from haagenti.index import compact
from haagenti.library import FragmentLibrary
from jobs import refuse_relative_in_job
from haagenti.store.leases import writing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.gc")
    ap.add_argument("--library", required=True)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for running writers to finish")
    args = ap.parse_args(argv)
    try:
        lib = FragmentLibrary.open(refuse_relative_in_job("--library", args.library), create=False)
        with writing(lib.store, "gc", wait=args.wait):  # one lease for all: no writer in between
            r = lib.gc()
            compacted = compact(lib.store) + lib.store.compact()  # gc's deletes rewrite index files: sort them again
    except HaagentiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"gc: {r['fragments_removed']} fragments removed, {r['bytes_freed']:,} B freed; {compacted} files compacted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
