"""The thresholds that classify a match, on quantities measured on the real values (the
signatures only propose and rank: haagenti.matching, haagenti.index)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


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
