"""Collect unreferenced fragments and compact the library's tables.

    ray job submit --working-dir . -- python -m jobs.gc --library s3://b/lib
Refused (one line) while another writer holds the library, unless --wait outlasts it.
"""
from __future__ import annotations

import argparse
import sys

from haagenti.library import FragmentLibrary
from haagenti.maintenance import gc_line
from jobs import exclusive_job


def collect(lib: FragmentLibrary, args: argparse.Namespace) -> str:
    r = lib.gc()
    compacted = lib.compact()
    return gc_line(r) + (f"; {compacted} files compacted" if compacted else "")


def main(argv: list[str] | None = None) -> int:
    return exclusive_job("jobs.gc", argv, collect)


if __name__ == "__main__":
    sys.exit(main())
