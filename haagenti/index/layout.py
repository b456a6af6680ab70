"""The interface every index layout implements, and the registry that finds one by name.

An index layout is how a library finds, for new fragments, which ids it holds already and which
stored fragments may serve as delta references, in tables of its own that grow with the library
and are read by key (never whole). The layout a library uses is one of its invariants
(`LibraryConfig.index`, recorded in haagenti.json); a layout registers under that name, as
codecs do in haagenti.codecs (zarr v3's registries are the model), so a new one plugs in here
without the ingest paths, maintenance or jobs knowing which it is."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable

import pyarrow as pa

from haagenti.errors import LibraryError

if TYPE_CHECKING:
    from haagenti.signature import SignatureConfig
    from haagenti.store import LibraryStore


Scoper = Callable[[pa.Table, bool], "pa.Table | None"]  # (a run's next band rows, whether more follow) -> them scoped, or None: call again with the next too


class IndexLayout(ABC):
    """One library's index, as a layout keeps it. Built cheaply (no reads); a layout object
    caches what it reads (footers, key ranges) for its life: one per ingest, or per worker."""

    name: ClassVar[str]  # what haagenti.json records
    tables: ClassVar[tuple[str, ...]]  # the library tables it keeps (stats counts them as the index)

    @abstractmethod
    def __init__(self, store: LibraryStore, signature: SignatureConfig, keep_footers: bool = True): ...

    @abstractmethod
    def append(self, fragments: pa.Table, signatures: pa.Table, data_file: str | None, note: str = "") -> None:
        """Index newly committed fragments (their fragments rows without blobs, and the
        signatures of those that have one), appended in the fragments data file whose uuid is
        `data_file`. Written after the fragments and signatures, before the manifests and models
        that publish them (haagenti.writer)."""

    @abstractmethod
    def propose(self, wanted: pa.Table) -> pa.Table:
        """Reference candidates for a batch: the library's band rows (band, band_hash,
        fragment_id, bits, n_elements, depth) in the (band, band_hash) buckets of `wanted`
        (haagenti.matching ranks them). `wanted` also carries the `scope` its rows were given
        (one value per call: haagenti.matching.partner_pairs asks per scope)."""

    def scoper(self) -> Scoper:
        """A run's scoper: called on the run's new band rows (haagenti.matching.match_rows) in
        run order, batch after batch or all at once, it fills their `scope`, what `propose` is
        told with their buckets; the same rows get the same scopes however the run is cut. Told
        that `more` rows follow, it may answer None: it needs them to scope these, and is
        called again with these and the next (a scope taken from later rows). A layout that
        proposes by bucket alone leaves it null."""
        return _unscoped

    @abstractmethod
    def known(self, ids: Iterable[str]) -> dict[str, str]:
        """Those of `ids` the library holds, with their dtypes; never the whole id set."""

    @abstractmethod
    def locate(self, ids: set[str]) -> dict[str, str]:
        """Where fragments were appended: id -> the uuid of its fragments data file, for the ids
        it knows (LibraryStore.read_fragments' hints, never trusted for an answer)."""

    @abstractmethod
    def delete_except(self, present: pa.Array) -> int:
        """Delete the rows of every fragment not in `present` (gc: the fragments kept), before
        the fragments themselves go. Returns rows deleted."""

    @abstractmethod
    def compact(self, target_bytes: int = 256 * 1024 * 1024) -> int:
        """Rewrite the layout's tables for lookups (files of about `target_bytes`). Deletes
        nothing (vacuum does). Returns data files replaced (0: nothing to do)."""


def _unscoped(rows: pa.Table, more: bool = False) -> pa.Table:
    return rows


LAYOUTS: dict[str, type[IndexLayout]] = {}


def register_layout(cls: type[IndexLayout]) -> type[IndexLayout]:
    """Register a layout under its `name` (a class decorator)."""
    if cls.name in LAYOUTS and LAYOUTS[cls.name] is not cls:
        raise ValueError(f"index layout {cls.name!r} is registered already")
    LAYOUTS[cls.name] = cls
    return cls


def layout_class(name: str) -> type[IndexLayout]:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LibraryError(f"this library's index layout is {name!r}, which this haagenti does not know (it knows {', '.join(sorted(LAYOUTS))})") from None
