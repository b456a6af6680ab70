"""Thin entrypoints for `ray job submit ... -- python -m jobs.<name>`."""
from __future__ import annotations

import os
import posixpath

from haagenti.errors import HaagentiError

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
