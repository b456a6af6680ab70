"""Similarity index over fragment signatures, and the thresholds that classify a match.

Banding and candidate lookup use datasketch's MinHashLSH: it takes any signature that is a
vector of hash values, so the SimHash bits go in as a 0/1 vector with params=(bands, rows),
and we get its insert/query/remove/merge. What datasketch does not do is persist to a
columnar format that many shards can merge by a group-by, so `band_table()` writes the
(band, band_hash, fragment_id) table the Ray pipeline shuffles and joins.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from haagenti.signature import SignatureConfig, hamming

if TYPE_CHECKING:
    from datasketch import LeanMinHash


class MatchType(str, Enum):
    EXACT = "exact"
    NEAR_DUPLICATE = "near_duplicate"
    SIMILAR = "similar"
    UNRELATED = "unrelated"


@dataclass(frozen=True)
class SimilarityThreshold:
    """Thresholds on quantities measured on the real values, not on signatures:
    - exact: identical bytes (same FragmentId);
    - near-duplicate: cosine >= `near_duplicate_cosine`; stored losslessly as a delta, and
      kept only when the encoded delta is smaller than the fragment encoded alone;
    - similar: cosine >= `similar_cosine`; shared lossily only when the caller opted in with
      a bound on the relative L2 error (||a-b|| / ||a||) and the measured error is within it.
    The signature's estimated cosine only ranks candidates."""

    near_duplicate_cosine: float = 0.98
    similar_cosine: float = 0.90

    def classify(self, cosine: float, identical: bool = False) -> MatchType:
        if identical:
            return MatchType.EXACT
        if cosine >= self.near_duplicate_cosine:
            return MatchType.NEAR_DUPLICATE
        if cosine >= self.similar_cosine:
            return MatchType.SIMILAR
        return MatchType.UNRELATED


@dataclass(frozen=True)
class SimilarityMatch:
    fragment_id: str
    candidate_id: str
    match_type: MatchType
    cosine: float
    rel_l2_error: float
    max_abs_error: float


def measure(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(cosine, relative L2 error of b as a stand-in for a, max abs error) over finite values."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        cos = 1.0 if na == nb else 0.0
    else:
        cos = float(np.dot(a, b) / (na * nb))
    diff = a - b
    rel = float(np.linalg.norm(diff) / na) if na else (0.0 if not diff.size or not diff.any() else float("inf"))
    mx = float(np.abs(diff).max()) if diff.size else 0.0
    return cos, rel, mx


class SimilarityIndex:
    """LSH index: fragment id -> SimHash bits, with banded candidate lookup."""

    def __init__(self, config: SignatureConfig = SignatureConfig()):
        # Imported here: datasketch pulls in scipy (~0.4 s), which every pipeline worker and
        # CLI start would otherwise pay without ever building an index.
        from datasketch import MinHashLSH

        self.config = config
        self.lsh = MinHashLSH(num_perm=config.bits, params=(config.bands, config.rows))
        self.bits: dict[str, bytes] = {}
        self.lengths: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.bits)

    def __contains__(self, fragment_id: str) -> bool:
        return fragment_id in self.bits

    def _minhash(self, bits: bytes) -> "LeanMinHash":
        from datasketch import LeanMinHash

        values = np.unpackbits(np.frombuffer(bits, np.uint8)).astype(np.uint64)
        return LeanMinHash(seed=self.config.seed, hashvalues=values, scheme="legacy")

    def insert(self, fragment_id: str, bits: bytes, n_elements: int) -> None:
        if fragment_id in self.bits:
            return
        self.lsh.insert(fragment_id, self._minhash(bits), check_duplication=False)
        self.bits[fragment_id] = bits
        self.lengths[fragment_id] = n_elements

    def remove(self, fragment_id: str) -> None:
        if fragment_id in self.bits:
            self.lsh.remove(fragment_id)
            del self.bits[fragment_id]
            del self.lengths[fragment_id]

    def query(self, bits: bytes, k: int = 4, n_elements: int | None = None, exclude: str | None = None) -> list[tuple[str, int]]:
        """Up to k candidates sharing at least one band, nearest (Hamming) first; ties by id so
        the answer is deterministic. `n_elements` keeps only fragments of that length."""
        found = []
        for fid in self.lsh.query(self._minhash(bits)):
            if fid == exclude or (n_elements is not None and self.lengths[fid] != n_elements):
                continue
            found.append((hamming(bits, self.bits[fid]), fid))
        found.sort()
        return [(fid, d) for d, fid in found[:k]]

    def merge(self, other: "SimilarityIndex") -> None:
        if other.config != self.config:
            raise ValueError("cannot merge indexes built with different signature configs")
        for fid, bits in sorted(other.bits.items()):
            self.insert(fid, bits, other.lengths[fid])

    def band_table(self) -> pa.Table:
        """(band, band_hash, fragment_id): the index as rows, for shuffles and joins at scale."""
        ids = sorted(self.bits)
        return band_rows(ids, [self.bits[i] for i in ids], self.config)

    def to_table(self) -> pa.Table:
        ids = sorted(self.bits)
        return pa.table(
            {"fragment_id": ids, "bits": pa.array([self.bits[i] for i in ids], pa.binary()), "n_elements": [self.lengths[i] for i in ids]}
        )

    @classmethod
    def from_table(cls, table: pa.Table, config: SignatureConfig = SignatureConfig()) -> "SimilarityIndex":
        index = cls(config)
        for fid, bits, n in zip(table["fragment_id"].to_pylist(), table["bits"].to_pylist(), table["n_elements"].to_pylist()):
            index.insert(fid, bits, n)
        return index


def band_rows(ids: list[str], bits: list[bytes], config: SignatureConfig) -> pa.Table:
    """Explode signatures into one row per band, keyed as the library's index keys them
    (haagenti.index.band_hashes: a band's bits are its own hash)."""
    from haagenti.index import band_hashes

    hashes = band_hashes(bits, config)
    return pa.table(
        {
            "band": pa.array(np.tile(np.arange(config.bands, dtype=np.int16), len(ids))),
            "band_hash": pa.array(hashes.reshape(-1).astype(np.uint64)),
            "fragment_id": pa.array(np.repeat(np.array(ids, dtype=object), config.bands), pa.string()),
        }
    )
