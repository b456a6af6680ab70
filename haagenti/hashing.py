"""The one content hash of the library: fragment ids, file hashes and model content hashes.

BLAKE3 (the `blake3` package, the BLAKE3 team's bindings) rather than sha256: every fragment is
hashed on ingest and again on every read, so the hash is on the hot path of both. Measured on
256 KiB inputs, one core of the 2-core development machine (docs/decisions/0004-blake3.md): blake3 3.2 GB/s, sha256 1.5 GB/s (OpenSSL with
SHA-NI), blake2b 0.8 GB/s. BLAKE3 is collision resistant like
sha256 (content ids must be: a collision would silently swap a fragment), and HuggingFace's Xet
storage addresses chunks with it too.
"""
from __future__ import annotations

import struct

from blake3 import blake3


def content_hash(data: bytes | memoryview) -> str:
    """Hex BLAKE3 (256-bit) of `data`."""
    return blake3(data).hexdigest()


def hasher() -> blake3:
    """A streaming hasher (`update`, `hexdigest`) for files read or written in pieces."""
    return blake3()


# Key-derivation mode gives layout digests their own domain: never equal to a content hash.
_LAYOUT_CONTEXT = "haagenti 2026-11-23 file layout v1"


def file_layout(inline: bytes, fragment_ids: list[str]) -> str:
    """A file's layout digest: its inline bytes (a safetensors length and header, or a side
    file's bytes) and the ids of its fragments in order. Each fragment read is verified against
    its id, so a restore whose layout matches wrote the original bytes (given BLAKE3's collision
    resistance) without hashing every byte a second time; HuggingFace's Xet likewise hashes a
    file as a tree over its chunk hashes. `haagenti verify` still re-hashes the bytes."""
    h = blake3(derive_key_context=_LAYOUT_CONTEXT)
    h.update(struct.pack("<QQ", len(inline), len(fragment_ids)))
    h.update(inline)
    h.update(bytes.fromhex("".join(fragment_ids)))
    return h.hexdigest()


def model_hash(file_hashes: list[str]) -> str:
    """A model's content hash: the hash of its files' hashes in order (what an incremental run
    compares to decide whether a model changed)."""
    return content_hash("".join(file_hashes).encode())


_RECORD_CONTEXT = "haagenti 2026-12-07 model record v1"


def record_hasher() -> blake3:
    """A hasher for a model's record digest (haagenti.records.record_digest): its own domain,
    never equal to a content hash or a layout digest."""
    return blake3(derive_key_context=_RECORD_CONTEXT)
