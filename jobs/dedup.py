"""Deduplicate a catalog into a library on Ray.

    ray job submit --working-dir . -- python -m jobs.dedup --catalog s3://b/catalog.yaml --library s3://b/lib
    python -m jobs.dedup --catalog demo/family/catalog.yaml --library demo/lib   # local Ray cluster
"""
from __future__ import annotations

import argparse
import os
import posixpath
import sys
from typing import Callable

from haagenti.codecs import DENSE, PLANES
from haagenti.config import LibraryConfig
from haagenti.errors import HaagentiError
from jobs import refuse_relative_in_job


def main(argv: list[str] | None = None, progress: Callable[[str], None] | None = None) -> int:
    """Run the job; `progress(stage)` is called as each pipeline stage ends (the CLI's bar)."""
    ap = argparse.ArgumentParser(prog="jobs.dedup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--library", required=True)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: a local one, or the job's cluster)")
    ap.add_argument("--executor", choices=["ray", "local"], default="ray")
    ap.add_argument("--workers", type=int, default=None, help="CPU step actors on Ray (default: one per cluster CPU; signatures also get one actor per GPU), threads with --executor local (default 1)")
    ap.add_argument("--fragment-size", type=int, default=None, help="bytes per fragment of a 16-bit tensor, for a new library (default 256 KiB); an existing library keeps its own")
    ap.add_argument("--index", default=None, help="index layout of a new library: bands (default) or two-level; an existing library keeps its own")
    ap.add_argument("--prune", action="store_true", help="remove models no longer in the catalog and collect their fragments")
    ap.add_argument("--rehash", action="store_true", help="hash every catalog file, trusting no stamp (size and mtime, or ETag) kept by the last run")
    ap.add_argument("--file-blake3", action="store_true", help="also record each file's plain BLAKE3 (b3sum's), to compare with published checksums")
    ap.add_argument("--dense-quantized", action="store_true", help="also range-code quantized GGUF blocks where smaller (1-1.6 points more saved, ~2-3x the ingest and restore time)")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    from pipelines.dedup import preflight, run_dedup
    from pipelines.executors import make_executor
    from pipelines.report import report_folder, report_path, write_report

    try:
        catalog = preflight(refuse_relative_in_job("--catalog", args.catalog), refuse_relative_in_job("--library", args.library), args.executor == "ray")
        for e in catalog.entries:
            for f in e.files:
                refuse_relative_in_job(f"model {e.model_id!r}: file", f)
        config = LibraryConfig(fragment_size=args.fragment_size, index=args.index, file_blake3=args.file_blake3,
                               zstd_level=DENSE if args.dense_quantized else PLANES)
        executor = make_executor(args.executor, args.address, args.workers)  # Ray starts only now
        run = run_dedup(args.catalog, args.library, executor, config, prune=args.prune, progress=progress, rehash=args.rehash)
        if not args.no_report and not run.nothing_to_do:
            from haagenti.library import FragmentLibrary

            paths = write_report(FragmentLibrary.open(args.library, create=False), run)
            print(f"report: {paths['report.html']}")
        elif not args.no_report:
            fs, folder = report_folder(args.library)
            if fs.exists(posixpath.join(folder, "report.html")):
                print(f"report: {report_path(args.library, 'report.html')} (of the last run that changed the library)")
        for mid, fam in run.inferred_families.items():
            print(f"inferred family of {mid}: {fam or 'none'}")
        print(run.summary())
        if run.gc_skipped:
            print(f"gc skipped: {run.gc_skipped}")
        return 0
    except (HaagentiError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
