"""Thin entrypoints for `ray job submit ... -- python -m jobs.<name>`."""
from __future__ import annotations

import argparse
import os
import posixpath
import sys
from typing import TYPE_CHECKING, Callable

from haagenti.errors import HaagentiError

if TYPE_CHECKING:
    from haagenti.library import FragmentLibrary

# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class JobPathError(HaagentiError):
    """A path that would silently resolve inside a Ray job's temporary working directory."""


def refuse_relative_in_job(what: str, path: str) -> str:
    """A submitted job runs in a temporary copy of --working-dir that is deleted when it ends,
    and the submitting directory is not known there (nor present on a remote cluster): a
    relative path would read the upload (gitignored files are not in it) or write into a folder
    about to vanish. Refused, with the fix, rather than guessed."""
    if os.environ.get(_RAY_JOB_ENV) and "://" not in path and not posixpath.isabs(path):
        raise JobPathError(
            f"{what} {path!r} is relative, and this Ray job runs in a temporary copy of --working-dir "
            "(deleted when it ends; gitignored files are not uploaded): pass an absolute path or a URL (s3://...)"
        )
    return path


def exclusive_job(prog: str, argv: list[str] | None, work: Callable[["FragmentLibrary", argparse.Namespace], str],
                  options: Callable[[argparse.ArgumentParser], object] = lambda ap: None) -> int:
    """The entrypoint of a job that rewrites a library's data files (gc, compact): parses
    --library (refused when relative in a Ray job) and --wait plus `options`, runs `work` under
    the gc lease, which no other writer holds meanwhile, and prints the line it returns, or one
    error line (exit 1): refused while another writer runs unless --wait outlasts it."""
    from haagenti.library import FragmentLibrary
    from haagenti.store.leases import writing

    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--library", required=True)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for running writers to finish")
    options(ap)
    args = ap.parse_args(argv)
    try:
        lib = FragmentLibrary.open(refuse_relative_in_job("--library", args.library), create=False)
        with writing(lib.store, "gc", wait=args.wait):  # one lease for all the work: no writer in between
            line = work(lib, args)
    except HaagentiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(line)
    return 0
