"""Library configuration and statistics."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass, replace

from haagenti.codecs.core import PLANES
from haagenti.errors import DamagedError, LibraryError
from haagenti.signature import SignatureConfig
from haagenti.similarity import SimilarityThreshold

MIN_FRAGMENT = 64 * 1024
MAX_FRAGMENT = 1024 * 1024
MAX_RAW_FRAGMENT = 4 * MAX_FRAGMENT  # fragment_size // 2 elements of an 8-byte dtype
# Deltas reference deltas up to this many hops (docs/decisions/0101-reference-chains.md): a
# reader decodes at most this many references to reach a fragment's bytes and refuses more.
MAX_CHAIN_DEPTH = 4


# A library's invariants: fixed when it is created (haagenti.json) and used from then on.
# Another fragment size cuts other fragments (other ids: no exact match with what is stored),
# another signature configuration gives bits that cannot be compared with the stored ones, and
# the thresholds and candidate count decide which references an ingest chooses, and the index
# layout (haagenti.index) is how its index tables are kept.
INVARIANTS = ("fragment_size", "signature", "thresholds", "candidates", "index")
# The index layout of every library written before layouts were named: a haagenti.json without
# "index" is read as this one (docs/format.md).
DEFAULT_INDEX = "bands"
_DEFAULTS = {"fragment_size": 256 * 1024, "signature": SignatureConfig(), "thresholds": SimilarityThreshold(), "candidates": 2, "index": DEFAULT_INDEX}


@dataclass(frozen=True)
class LibraryConfig:
    """`fragment_size` is the byte size of a fragment of a 16-bit tensor. Tensors are cut on
    element boundaries (fragment_size // 2 elements), so fragment k of a tensor covers the same
    elements in bf16, fp16 or fp32: that is what lets a re-export match its base.

    The INVARIANTS left as None take the library's values (the defaults for a new library);
    `given` records those set explicitly, which must agree with the library's."""

    fragment_size: int | None = None
    zstd_level: int | str = PLANES  # the plane-tuned zstd preset; or a zstd level (docs/decisions/0006-plain-coding.md)
    similarity: bool = True
    candidates: int | None = None  # signature neighbours tried as delta references
    lossy_threshold: float | None = None  # max relative L2 error for lossy sharing; None = lossless only
    batch_bytes: int = 64 * 1024 * 1024  # bytes per fragments commit (a two-level shard); raw bytes per encode batch up to ingest_steps.ENCODE_BATCH_BYTES
    signature: SignatureConfig | None = None
    thresholds: SimilarityThreshold | None = None
    index: str | None = None  # the index layout's registered name (haagenti.index)
    file_blake3: bool = False  # also record each file's plain BLAKE3 (files.blake3), for comparing with published checksums

    def __post_init__(self) -> None:
        object.__setattr__(self, "given", frozenset(k for k in INVARIANTS if getattr(self, k) is not None))
        for k, v in _DEFAULTS.items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if not MIN_FRAGMENT <= self.fragment_size <= MAX_FRAGMENT or self.fragment_size & (self.fragment_size - 1):
            raise ValueError(f"fragment_size must be a power of two in [{MIN_FRAGMENT}, {MAX_FRAGMENT}], not {self.fragment_size}")
        if self.lossy_threshold is not None and not 0 < self.lossy_threshold < 1:
            raise ValueError("lossy_threshold is a relative L2 error in (0, 1)")

    @property
    def fragment_elements(self) -> int:
        return self.fragment_size // 2

    def invariants(self) -> dict:
        """The invariants as JSON values (what haagenti.json records)."""
        return {k: asdict(v) if is_dataclass(v) else v for k, v in ((k, getattr(self, k)) for k in INVARIANTS)}

    def settled(self, stored: dict, where: str) -> "LibraryConfig":
        """This config with a library's invariants (`stored`, as `invariants()` writes them);
        one set explicitly to another value is refused."""
        try:  # haagenti.json is read from the library: untrusted, and checked as a config given by hand is
            values = {"fragment_size": stored["fragment_size"], "signature": SignatureConfig(**stored["signature"]),
                      "thresholds": SimilarityThreshold(**stored["thresholds"]), "candidates": stored["candidates"],
                      "index": stored.get("index", DEFAULT_INDEX)}
            settled = replace(self, **values)
            if not isinstance(settled.candidates, int) or isinstance(settled.candidates, bool) or settled.candidates < 0:
                raise ValueError(f"candidates must be a whole number >= 0, not {settled.candidates!r}")
            if not isinstance(settled.index, str):
                raise ValueError(f"index must be a layout's name, not {settled.index!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedError(f"{where}: haagenti.json is damaged: its invariants are not valid ({type(e).__name__}: {e})") from None
        for k in sorted(self.given):
            if getattr(self, k) != values[k]:
                raise LibraryError(f"{where}: this library's {k} is {_show(values[k])}, not {_show(getattr(self, k))}; it is fixed when a library is created (docs/format.md)")
        return settled


def _show(value) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(value).items()) if is_dataclass(value) else str(value)


@dataclass
class ModelStats:
    model_id: str
    family: str | None
    raw_bytes: int
    new_stored_bytes: int  # stored bytes of fragments this model was first to reference
    fragments: int
    lossy_fragments: int
    disk_bytes: int = 0  # new_stored_bytes plus the bytes its record keeps verbatim (headers, gaps, side files)

    @property
    def reduction(self) -> float:
        return 1 - self.disk_bytes / self.raw_bytes if self.raw_bytes else 0.0


@dataclass
class LibraryStats:
    models: int
    fragments: int
    raw_bytes: int  # sum of the models' file sizes
    stored_bytes: int  # sum of the stored blobs the published models reference
    plain_fragments: int
    delta_fragments: int  # stored against a reference: deltas and predicted quantized blocks
    shared_fragments: int  # referenced by two or more models
    refs_per_shared_fragment: float
    lossy_refs: int
    lossy_saved_bytes: int  # raw bytes served by lossy sharing instead of their own fragment
    per_model: list[ModelStats]
    per_family: dict[str, float]
    unreferenced_bytes: int = 0  # stored blobs no published model references (gc frees them)
    unreferenced_fragments: int = 0  # how many (not among `fragments`, `plain_fragments`, `delta_fragments`)
    # Every byte the library's files occupy (LibraryStore.disk_bytes), and by part: fragments,
    # signatures, index (bands and ids), manifests, models, logs (every Delta log), other.
    disk_bytes: int = 0
    disk_by_part: dict[str, int] = field(default_factory=dict)
    predicted_fragments: int = 0  # of `delta_fragments`, quantized blocks predicted from a float source

    @property
    def saved_bytes(self) -> int:
        return self.raw_bytes - self.disk_bytes

    @property
    def reduction(self) -> float:
        """The headline: 1 - on disk / raw, as `du` against the models' file sizes."""
        return 1 - self.disk_bytes / self.raw_bytes if self.raw_bytes else 0.0

    @property
    def stored_reduction(self) -> float:
        """1 - fragment blobs / raw: the fragments alone."""
        return 1 - self.stored_bytes / self.raw_bytes if self.raw_bytes else 0.0
