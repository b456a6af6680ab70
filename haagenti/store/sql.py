"""SQL predicates for Delta deletes, built here only (the store's delete methods call them)."""
from __future__ import annotations

from haagenti.errors import FragmentError

IN_LIST = 500  # values per `IN (...)` predicate: one delete commit each


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


def in_lists(column: str, values: list[str]) -> list[str]:
    """`column IN (...)` predicates covering `values`, IN_LIST values each."""
    return [f"{column} IN ({', '.join(quote(v) for v in values[i : i + IN_LIST])})" for i in range(0, len(values), IN_LIST)]


def hex_in_lists(column: str, values: list[str]) -> list[str]:
    """`column IN (X'..', ...)` predicates for a binary column holding hex ids' raw bytes."""
    lits = ["X'" + bytes.fromhex(v).hex() + "'" for v in values]  # fromhex: only hex reaches SQL
    return [f"{column} IN ({', '.join(lits[i : i + IN_LIST])})" for i in range(0, len(lits), IN_LIST)]
