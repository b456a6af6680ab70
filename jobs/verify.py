"""Verify a library (every fragment re-hashed, every model's files re-hashed).

    ray job submit --working-dir . -- python -m jobs.verify --library s3://b/lib [--model ID]
"""
from __future__ import annotations

import argparse
import sys

from haagenti.errors import HaagentiError
from haagenti.library import FragmentLibrary
from jobs import refuse_relative_in_job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jobs.verify")
    ap.add_argument("--library", required=True)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    try:
        r = FragmentLibrary.open(refuse_relative_in_job("--library", args.library), create=False).verify(args.model)
    except HaagentiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for e in r.errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{'ok' if r.ok else 'FAILED'}: {r.fragments_checked} fragments, {r.models_checked} models, {r.files_checked} files")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
