"""Scan stamps: each catalog file's identity (size and mtime_ns on a local disk, size and ETag
on an object store) when the pipeline last hashed it, so that a re-run proves a model unchanged
without reading its bytes (decisions/0271).

The stamps are a cache of the pipeline's own, `scan-stamps.parquet` in the library's folder and
no table of the library: a stamp says "this URL, while it looked like this, had this file hash"
(its tree, hashing.file_tree, over the library's fragment size), which is true whatever the
library holds. A stamps file written before file hashes were trees (a `blake3` column of
whole-file hashes) reads with no hashes, so its models are hashed once more. A lost, stale or unreadable file costs a re-hash,
never a wrong library, unless a file's bytes change while its stamp does not (an in-place
rewrite that keeps size and mtime); `--rehash` ignores the stamps for users who distrust them.
"""
from __future__ import annotations

import os
import posixpath
import time

import pyarrow as pa
import pyarrow.parquet as pq

from haagenti.formats.source import expand_files
from haagenti.fsio import filesystem_for

STAMPS_FILE = "scan-stamps.parquet"
SCHEMA = pa.schema([("model_id", pa.string()), ("url", pa.string()), ("stamp", pa.string()), ("file_hash", pa.string())])
# A local file modified this recently when stamped may still be written within one tick of the
# filesystem's clock, leaving its mtime as stamped: it is hashed, and its stamp not kept.
SETTLE_NS = 2_000_000_000

Stamps = dict[str, tuple[str, str]]  # url -> (stamp, the file hash of the bytes it had under that stamp)


def file_stamps(urls: list[str]) -> dict[str, str | None]:
    """Each file's stamp by URL (folders expanded as the scan does); None where the store gives
    nothing that changes with the bytes (no ETag) or the file is still settling."""
    out: dict[str, str | None] = {}
    for url, _, _, info in expand_files(urls):
        fs, path = filesystem_for(url)
        if "file" in fs.protocol:  # fsspec gives mtime as float seconds: 0.2-0.5 us steps today
            st = os.stat(path)
            settled = time.time_ns() - st.st_mtime_ns > SETTLE_NS
            out[url] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" if settled else None
        else:
            etag = info.get("ETag") or info.get("etag")
            out[url] = f"{info['size']}:{etag}" if etag else None
    return out


def _path(library_url: str) -> tuple[object, str]:
    fs, root = filesystem_for(library_url)
    return fs, posixpath.join(root, STAMPS_FILE)


def read_stamps(library_url: str) -> dict[str, Stamps]:
    """The stamps by model id; none when there are none yet or the file cannot be read (a cache:
    the scan then hashes every file)."""
    fs, path = _path(library_url)
    try:
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f, schema=SCHEMA).to_pylist()
    except (OSError, ValueError, pa.ArrowException):
        return {}
    out: dict[str, Stamps] = {}
    for r in rows:
        out.setdefault(r["model_id"], {})[r["url"]] = (r["stamp"], r["file_hash"])
    return out


def write_stamps(library_url: str, stamps: dict[str, Stamps]) -> None:
    """Replace the stamps file whole (a local file is renamed into place, an object is one PUT)."""
    rows = [(mid, url, s, d) for mid, by_url in sorted(stamps.items()) for url, (s, d) in sorted(by_url.items())]
    table = pa.Table.from_arrays([pa.array(c, pa.string()) for c in zip(*rows)] if rows else [pa.array([], pa.string())] * 4, schema=SCHEMA)
    fs, path = _path(library_url)
    if "file" in fs.protocol:
        tmp = f"{path}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
