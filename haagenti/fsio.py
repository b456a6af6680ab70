"""fsspec filesystems for any URL, configured from the standard AWS_* environment for s3://
(so model files, library tables and pipeline outputs all reach the same endpoint)."""
from __future__ import annotations

import os
from functools import lru_cache

import fsspec


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    return _filesystem_for(url, s3_endpoint() if url.startswith(("s3://", "s3a://")) else None)


@lru_cache(maxsize=4096)
def _filesystem_for(url: str, endpoint: str | None) -> tuple[fsspec.AbstractFileSystem, str]:
    # Cached: parsing a URL into a filesystem costs ~60 us, and ingest reads every tensor
    # through it. fsspec caches the filesystem instances themselves.
    kwargs = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return fsspec.core.url_to_fs(url, **kwargs)
