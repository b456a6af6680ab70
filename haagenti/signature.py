"""Locality-sensitive signatures of fragment *values*, bit-identical on any device.

SimHash (signed random projections) collides with probability 1 - angle/pi, so it tracks
cosine similarity. Float projections would differ in the last bits between a CPU and a GPU
(different summation orders) and flip signs near zero, so every step here is exact:

1. values are quantised to integers q in [-L, L] with one multiplication by a factor computed
   in Python (IEEE round-to-nearest on every device; no division, no fused ops);
2. q times a fixed ±1 sign pattern is folded into `fold` buckets (a count sketch), a sum of
   small integers that float32 represents exactly, so summation order cannot matter;
3. the folded vector is projected on a fixed ±1 matrix: again integer sums below 2**53.
The same holds for the fingerprint (sums of q, min/max, integer histogram).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from haagenti.formats.dtypes import dtype as lookup_dtype


@dataclass(frozen=True)
class SignatureConfig:
    bits: int = 256
    bands: int = 16
    rows: int = 16
    fold: int = 2048
    levels: int = 127
    histogram_bins: int = 16
    seed: int = 20261123

    def __post_init__(self) -> None:
        if self.bands * self.rows != self.bits or self.bits % 8:
            raise ValueError(f"bands*rows must equal bits (a multiple of 8): {self.bands}*{self.rows} != {self.bits}")


@dataclass(frozen=True)
class FragmentSignature:
    """SimHash bits plus a statistical fingerprint of one fragment's values."""

    bits: bytes
    scale: float  # max |value| over finite values
    mean: float
    std: float
    min: float
    max: float
    nonfinite: int  # NaN/Inf count; such values are left out of the signature
    histogram: tuple[int, ...]

    def hamming(self, other: "FragmentSignature") -> int:
        return hamming(self.bits, other.bits)

    def estimated_cosine(self, other: "FragmentSignature", bits: int) -> float:
        return float(np.cos(np.pi * self.hamming(other) / bits))


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@lru_cache(maxsize=8)
def _patterns(config: SignatureConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ±1 sign pattern for n elements and the fold x bits projection, from a fixed seed
    (numpy's PCG64 stream is the same on every platform)."""
    rng = np.random.Generator(np.random.PCG64(config.seed))
    projection = rng.integers(0, 2, size=(config.fold, config.bits), dtype=np.int8) * 2 - 1
    signs = np.random.Generator(np.random.PCG64([config.seed, n])).integers(0, 2, size=n, dtype=np.int8) * 2 - 1
    return signs.astype(np.float32), projection.astype(np.float64)


def values_of(data: bytes, dtype_name: str) -> torch.Tensor:
    d = lookup_dtype(dtype_name)
    if not data:
        return torch.empty(0, dtype=torch.float32)
    return torch.frombuffer(bytearray(data), dtype=d.torch_dtype)


def compute_signatures(
    fragments: list[tuple[bytes, str]], config: SignatureConfig = SignatureConfig(), device: str | torch.device = "cpu"
) -> list[FragmentSignature]:
    """Signatures of (raw bytes, dtype) fragments, computed on `device`; same result anywhere.
    Fragments of equal length are stacked into one batch so a GPU sees large matrix products."""
    out: list[FragmentSignature | None] = [None] * len(fragments)
    by_len: dict[int, list[int]] = {}
    for i, (data, dt) in enumerate(fragments):
        by_len.setdefault(len(data) // lookup_dtype(dt).itemsize, []).append(i)
    for n, idx in by_len.items():
        batch = torch.stack([values_of(*fragments[i]).to(torch.float32) for i in idx]) if n else torch.zeros(len(idx), 0)
        for i, sig in zip(idx, _signature_batch(batch.to(device), config)):
            out[i] = sig
    return out  # type: ignore[return-value]


def _signature_batch(x: torch.Tensor, config: SignatureConfig) -> list[FragmentSignature]:
    """float32 is enough for exactness where it is used: values are converted once (a correctly
    rounded cast), the quantised q are integers of at most 8 bits, and every fold bucket sums at
    most n/fold of them, far below 2**24. Sums of q and q*q run in int64, the projection in float64."""
    b, n = x.shape
    x = x.to(torch.float32)
    absmax_t = x.abs().amax(1) if n else torch.zeros(b)
    if n and not bool(torch.isfinite(absmax_t).all()):  # only fragments with NaN/Inf pay for masking
        finite = torch.isfinite(x)
        nonfinite = (~finite).sum(1).cpu().tolist()
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        mins = torch.where(finite, x, inf).amin(1).cpu().tolist()
        maxs = torch.where(finite, x, -inf).amax(1).cpu().tolist()
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
        absmax_t = x.abs().amax(1)
    else:
        nonfinite = [0] * b
        mins = x.amin(1).cpu().tolist() if n else [0.0] * b
        maxs = x.amax(1).cpu().tolist() if n else [0.0] * b
    absmax = absmax_t.cpu().tolist()
    factors = torch.tensor([config.levels / s if s > 0 else 0.0 for s in absmax], dtype=torch.float32, device=x.device)
    q = torch.round(x * factors[:, None])
    qi = q.to(torch.int32)
    s1 = qi.sum(1, dtype=torch.int64).cpu().tolist()
    s2 = (qi * qi).sum(1, dtype=torch.int64).cpu().tolist()
    signs, projection = _patterns(config, n)
    pad = (-n) % config.fold
    signed = q * torch.from_numpy(signs).to(device=x.device, dtype=torch.float32)
    folded = torch.nn.functional.pad(signed, (0, pad)).reshape(b, -1, config.fold).sum(1)
    proj = folded.to(torch.float64) @ torch.from_numpy(projection).to(x.device)
    bits = np.packbits((proj > 0).cpu().numpy(), axis=1)
    # floor((q + L) * bins / (2L + 1)) with one IEEE multiply of small integers: exact bins
    # except where the true quotient is an integer, which only happens at q = -L (bin 0).
    bins = torch.floor((q + config.levels) * (config.histogram_bins / (2 * config.levels + 1))).to(torch.int32)
    offsets = torch.arange(b, device=x.device, dtype=torch.int32)[:, None] * config.histogram_bins
    hist = torch.bincount((bins + offsets).reshape(-1), minlength=b * config.histogram_bins).reshape(b, -1).cpu().tolist()
    out = []
    for i in range(b):
        unit = absmax[i] / config.levels
        count = max(n - nonfinite[i], 1)
        mean_q = s1[i] / count
        var_q = max(s2[i] / count - mean_q * mean_q, 0.0)
        out.append(
            FragmentSignature(
                bits=bits[i].tobytes(),
                scale=absmax[i],
                mean=mean_q * unit,
                std=float(np.sqrt(var_q)) * unit,
                min=mins[i],
                max=maxs[i],
                nonfinite=int(nonfinite[i]),
                histogram=tuple(int(h) for h in hist[i]),
            )
        )
    return out
