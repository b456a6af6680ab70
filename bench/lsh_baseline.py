"""datasketch's in-memory LSH over fragment signatures: the baseline bench/similarity.py measures
the library's index against (tests/test_similarity.py checks it).

datasketch's MinHashLSH takes any signature that is a vector of hash values, so the SimHash bits
go in as a 0/1 vector with params=(bands, rows), and we get its insert/query/remove/merge. It
keeps every band bucket in one process's dicts, which is why the library's index is tables
(haagenti.index) and this is a bench aid, not part of the library.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from haagenti.matching import signature_bands
from haagenti.signature import SignatureConfig, hamming

if TYPE_CHECKING:
    from datasketch import LeanMinHash


class SimilarityIndex:
    """LSH index: fragment id -> SimHash bits, with banded candidate lookup."""

    def __init__(self, config: SignatureConfig = SignatureConfig()):
        # Imported here: datasketch pulls in scipy (~0.4 s), which a bench that never builds
        # this index would otherwise pay.
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

    def band_rows(self) -> pa.Table:
        """(band, band_hash, fragment_id): the index as rows, keyed as the library's index keys them."""
        ids = sorted(self.bits)
        return signature_bands(ids, [self.bits[i] for i in ids], self.config)

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
