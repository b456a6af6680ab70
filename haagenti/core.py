"""LibraryCore: the reader/writer over a library's store that every operation takes.

It opens or creates a library, reads its catalogue (models, manifests, known fragments) and
fetches fragments, verifying each against its content hash. Ingest, restore, maintenance, the
loader and `haagenti://` reads take a `LibraryCore` and never call back up into
`FragmentLibrary`, which is a convenience built on top (haagenti.library; docs/architecture.md).
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

import pyarrow.compute as pc

from haagenti.config import LibraryConfig
from haagenti.encode import RawCache, decode_rows, fragment_rows
from haagenti.errors import FragmentError, LibraryError, UnknownModelError
from haagenti.index import layout_class, open_index
from haagenti.manifest import PIECES_FROM, ModelManifest, read_header_field, validate_model_id
from haagenti.parallel import Workers
from haagenti.records import trusted_manifest
from haagenti.store import LibraryStore
from haagenti.store.files import strings

# The tables every library has; its index layout adds its own (IndexLayout.tables).
LIBRARY_TABLES = ("fragments", "signatures", "manifests", "models")

Core = TypeVar("Core", bound="LibraryCore")


class LibraryCore:
    def __init__(self, store: LibraryStore, config: LibraryConfig):
        self.store = store
        self.config = config
        self.index = open_index(store, config)  # its ids reader's footers serve every fragment read

    @classmethod
    def open(cls: type[Core], url: str, config: LibraryConfig | None = None, create: bool = True) -> Core:
        """The library at `url` (created with `config`'s invariants unless `create` is False).
        Its config takes the library's invariants; one `config` sets to another value is refused."""
        store = LibraryStore(url)
        config = config or LibraryConfig()
        if not store.exists():
            if store.fs.isfile(store.root):
                raise LibraryError(f"{url}: is a file, not a library folder")
            if not create:
                raise LibraryError(f"{url}: no haagenti library here")
            layout = layout_class(config.index)  # a layout this haagenti knows, before it is recorded
            store.create(config.invariants(), LIBRARY_TABLES + layout.tables)
        return cls(store, config.settled(store.marker(), url))

    # ---- catalogue ----------------------------------------------------------------------
    def models(self) -> list[dict]:
        return sorted(self.store.read("models").to_pylist(), key=lambda m: m["ingest_seq"])

    def model(self, model_id: str) -> dict:
        validate_model_id(model_id)
        rows = self.store.read("models", equals=("model_id", model_id)).to_pylist()
        if not rows:
            raise UnknownModelError(f"model {model_id!r} is not in the library")
        return rows[0]

    def manifest(self, model_id: str) -> ModelManifest:
        model = self.model(model_id)
        rows = self.store.read("manifests", equals=("model_id", model_id))
        rows = rows.filter(pc.equal(rows["ingest_id"], strings([model["ingest_id"]])[0]))  # not an interrupted ingest's rows
        return trusted_manifest(self.with_verbatim(model), rows)  # names, counts and offsets are untrusted input

    def with_verbatim(self, model: dict) -> dict:
        """The models row with each file's verbatim bytes in `header`: held inline, or read from
        the fragments its pieces' ids name (rows of PIECES_FROM on; each piece verified against
        its id, and the bytes then by the record digest, which covers them)."""
        version = model.get("format_version")
        if not isinstance(version, int) or version < PIECES_FROM:
            return model
        where = f"model {model.get('model_id')!r}"
        held = [read_header_field(f["header"], f"{where}, file {f['name']!r}") for f in model["files"]]
        raw = self.fetch_raw({i for _, ids in held for i in ids})
        return model | {"files": [f | {"header": inline + b"".join(raw[i] for i in ids)} for f, (inline, ids) in zip(model["files"], held)]}

    def known_fragments(self) -> dict[str, str]:
        t = self.store.read("fragments", columns=["fragment_id", "dtype"])
        return dict(zip(t["fragment_id"].to_pylist(), t["dtype"].to_pylist()))

    # ---- fragments ----------------------------------------------------------------------
    def fetch_raw(self, ids: Iterable[str], cache: RawCache | None = None, workers: Workers | None = None,
                  tally: list[int] | None = None, place: Callable[[str, bytes], bool] | None = None,
                  rows: list[dict] | None = None) -> dict[str, bytes]:
        """Decoded, hash-verified bytes of fragments (and nothing else from the library),
        decoded over `workers` when given; `tally` gets the stored size of every row read;
        `place` takes fragments as they are decoded (haagenti.encode.decode_rows); `rows`: the
        rows of `ids` already read (`read_rows`)."""
        ids = set(ids)
        held = {i: cache.get(i) for i in ids} if cache else {}
        held = {i: v for i, v in held.items() if v is not None}  # taken now: decoding may evict them
        todo = ids - held.keys()
        if rows is None:
            rows = self.read_rows(todo, tally) if todo else []
        out = decode_rows(rows, lambda wanted: self.read_rows(wanted, tally, complete=False), cache, workers, place)
        out.update(held)
        return out

    def read_rows(self, ids: set[str], tally: list[int] | None = None, complete: bool = True) -> list[dict]:
        """The stored rows of fragments, blobs as views into Arrow's buffers (`fetch_raw` decodes
        them); every one of `ids` must be there when `complete`."""
        rows = fragment_rows(self.store.read_fragments(ids, locate=self.index.locate))
        if tally is not None:
            tally.extend(len(r["blob"]) for r in rows)
        missing = ids - {r["fragment_id"] for r in rows} if complete else set()
        if missing:
            raise FragmentError(f"fragment(s) missing from the library: {sorted(missing)[:3]}")
        return rows
