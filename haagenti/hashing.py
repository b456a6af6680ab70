"""The one content hash of the library: fragment ids, file trees and model content hashes.

BLAKE3 (the `blake3` package, the BLAKE3 team's bindings) rather than sha256: every fragment is
hashed on ingest and again on every read, so the hash is on the hot path of both. Measured on
256 KiB inputs, one core of the 2-core development machine (docs/decisions/0004-blake3.md): blake3 3.2 GB/s, sha256 1.5 GB/s (OpenSSL with
SHA-NI), blake2b 0.8 GB/s. BLAKE3 is collision resistant like
sha256 (content ids must be: a collision would silently swap a fragment), and HuggingFace's Xet
storage addresses chunks with it too.
"""
from __future__ import annotations

import struct
from typing import Sequence

from blake3 import blake3


def content_hash(data: bytes | memoryview) -> str:
    """Hex BLAKE3 (256-bit) of `data`."""
    return blake3(data).hexdigest()


def hasher() -> blake3:
    """A streaming hasher (`update`, `hexdigest`) for files read or written in pieces."""
    return blake3()


# Key-derivation mode gives file trees their own domain: never equal to a content hash.
_TREE_CONTEXT = "haagenti 2026-12-07 file tree v1"


def file_tree(gap_sizes: Sequence[int], gaps_digest: bytes, tensors: Sequence[tuple[int, int, int, int]],
              fragment_ids: Sequence[str]) -> str:
    """A byte-exact file's hash, a two-level tree over what is stored (as HuggingFace's Xet
    hashes a file over its chunk hashes): the leaves are the BLAKE3 of the file's gaps (its
    verbatim bytes, concatenated in file order) and its fragment ids in file order; the root is
    a keyed BLAKE3 over them and the layout that places them (each gap's size; per tensor, its
    fragment count and, for one the file holds transposed, the matrix's rows, cols and
    itemsize, else zeros). The fragment ids are the bytes' one hash: ingest hashes each byte
    once, and a restore whose ids and gaps match wrote the original file (given BLAKE3's
    collision resistance)."""
    h = blake3(derive_key_context=_TREE_CONTEXT)
    h.update(struct.pack(f"<Q{len(gap_sizes)}Q", len(gap_sizes), *gap_sizes))
    flat = [v for t in tensors for v in t]
    h.update(struct.pack(f"<Q{len(flat)}Q", len(tensors), *flat))
    h.update(gaps_digest)
    h.update(struct.pack("<Q", len(fragment_ids)))
    h.update(bytes.fromhex("".join(fragment_ids)))
    return h.hexdigest()


def model_hash(file_hashes: list[str]) -> str:
    """A model's content hash: the hash of its files' hashes in order (each file's tree, a
    checkpoint's BLAKE3): what an incremental run compares to decide whether a model changed."""
    return content_hash("".join(file_hashes).encode())


_RECORD_CONTEXT = "haagenti 2026-12-07 model record v1"


def record_hasher() -> blake3:
    """A hasher for a model's record digest (haagenti.records.record_digest): its own domain,
    never equal to a content hash or a file tree."""
    return blake3(derive_key_context=_RECORD_CONTEXT)
