"""Small helpers shared by tests."""
from __future__ import annotations

import hashlib


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def table_versions(lib) -> dict[str, int]:
    return lib.store.versions()
