"""SQL predicates for Delta deletes, built here only (the store's delete methods call them)."""
from __future__ import annotations

from haagenti.errors import FragmentError

IN_LIST = 500  # (model_id, ingest_id) pairs per predicate: one delete commit each


def quote(value: str) -> str:
    """A SQL string literal for Delta predicates (ids are validated, this is belt and braces)."""
    if "'" in value:
        raise FragmentError(f"refusing quote character in {value!r}")
    return f"'{value}'"


def owned_by(keys: list[tuple[str, str]]) -> list[str]:
    """Predicates covering the rows of the given (model_id, ingest_id) pairs, IN_LIST pairs each."""
    return [
        " OR ".join(f"(model_id = {quote(m)} AND ingest_id = {quote(i)})" for m, i in keys[k : k + IN_LIST])
        for k in range(0, len(keys), IN_LIST)
    ]
