"""fsspec filesystems for any URL, configured from the standard AWS_* environment for s3://
(so model files, library tables and pipeline outputs all reach the same endpoint)."""
from __future__ import annotations

import os

import fsspec


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    kwargs = {}
    if url.startswith(("s3://", "s3a://")) and s3_endpoint():
        kwargs["client_kwargs"] = {"endpoint_url": s3_endpoint()}
    return fsspec.core.url_to_fs(url, **kwargs)
