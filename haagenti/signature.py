"""Locality-sensitive signatures of fragment *values*, bit-identical on any device.

SimHash (signed random projections) collides with probability 1 - angle/pi, so it tracks
cosine similarity. Float projections would differ in the last bits between a CPU and a GPU
(different summation orders) and flip signs near zero, so every step here is exact:

1. values are quantised to integers q in [-L, L] with one multiplication by a factor computed
   in Python from the fragment's max |value| (IEEE round-to-nearest on every device; no
   division, no fused ops);
2. q times a fixed ±1 sign pattern is folded into `fold` buckets (a count sketch), a sum of
   small integers that float32 represents exactly, so summation order cannot matter;
3. the folded vector is projected on a fixed ±1 matrix: again integer sums, below 2**24.
The same holds for the fingerprint (sums of q, min/max, integer histogram).

Steps 1-3 and the mean/std/histogram run on a fixed sample of the fragment: every k-th element,
k = ceil(n / sample), so a full 131,072-element fragment is signed on 16,384 elements. The
cosine of two such samples tracks the cosine of the whole fragments (a fine-tune changes every
element a little; LSH only proposes, the real bytes decide). Measured: 4-5x faster signatures
on full fragments, near-duplicate recall unchanged (docs/decisions/0010-signatures.md). Min, max, the scale and
the NaN/Inf count are exact over all elements.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from haagenti.formats.dtypes import EXPONENT_MASKS, SignatureSample
from haagenti.formats.dtypes import dtype as lookup_dtype

if TYPE_CHECKING:
    import torch  # imported where signatures are computed: configs and hamming need no torch


@dataclass(frozen=True)
class SignatureConfig:
    bits: int = 256
    bands: int = 16
    rows: int = 16
    fold: int = 2048
    levels: int = 127
    histogram_bins: int = 16
    sample: int = 16384  # elements signed per fragment at most (a fixed stride over the rest)
    seed: int = 20261123

    def __post_init__(self) -> None:
        if self.bands * self.rows != self.bits or self.bits % 8:
            raise ValueError(f"bands*rows must equal bits (a multiple of 8): {self.bands}*{self.rows} != {self.bits}")
        if (self.sample + self.fold) * self.levels >= 2**24:  # keeps every float32 fold sum an exact integer
            raise ValueError(f"sample * levels must stay below 2**24: {self.sample} * {self.levels}")


@dataclass(frozen=True)
class FragmentSignature:
    """SimHash bits plus a statistical fingerprint of one fragment's values."""

    bits: bytes
    scale: float  # max |value| over finite values
    mean: float  # mean, std and histogram: of the finite values in the signature's sample
    std: float
    min: float  # min, max, scale and nonfinite: over all elements
    max: float
    nonfinite: int  # NaN/Inf count; such values are left out of the signature
    histogram: tuple[int, ...]

    def hamming(self, other: "FragmentSignature") -> int:
        return hamming(self.bits, other.bits)

    def estimated_cosine(self, other: "FragmentSignature", bits: int) -> float:
        return float(np.cos(np.pi * self.hamming(other) / bits))


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def band_hashes(bits: list[bytes] | np.ndarray, config: SignatureConfig) -> np.ndarray:
    """(fragments, bands) int64 band values: a band's `rows` bits are its own hash (rows <= 63).
    `bits`: signatures as bytes, or as an (n, bits / 8) uint8 array."""
    if config.rows > 63:
        raise ValueError("band keys need rows <= 63")
    if not len(bits):
        return np.zeros((0, config.bands), np.int64)
    packed = bits if isinstance(bits, np.ndarray) else np.frombuffer(b"".join(bits), np.uint8).reshape(len(bits), -1)
    if config.rows % 8 == 0:  # whole bytes: fold them big-endian, no bit unpacking
        per = packed.reshape(len(packed), config.bands, config.rows // 8)
        out = np.zeros((len(packed), config.bands), np.int64)
        for j in range(config.rows // 8):
            out = (out << 8) | per[:, :, j]
        return out
    arr = np.unpackbits(packed, axis=1)
    weights = np.int64(1) << np.arange(config.rows, dtype=np.int64)[::-1]
    return (arr.reshape(len(bits), config.bands, config.rows).astype(np.int64) * weights).sum(axis=2)


@lru_cache(maxsize=4)
def _projection(config: SignatureConfig) -> np.ndarray:
    """The fold x bits ±1 projection, from a fixed seed (numpy's PCG64 stream is the same on
    every platform). Built once per config: it cost ~1.5 ms, more than signing a small fragment."""
    rng = np.random.Generator(np.random.PCG64(config.seed))
    return (rng.integers(0, 2, size=(config.fold, config.bits), dtype=np.int8) * 2 - 1).astype(np.float64)


@lru_cache(maxsize=8)
def _projection_on(config: SignatureConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The projection as a tensor where it is used: converting the 4 MB matrix took ~250 us,
    once per batch of 8 fragments on a CPU (~4% of an ingest with similarity)."""
    import torch

    return torch.from_numpy(_projection(config)).to(device=device, dtype=dtype)


@lru_cache(maxsize=256)
def _signs(config: SignatureConfig, n: int) -> np.ndarray:
    """The ±1 sign pattern for n elements (a model has a few hundred distinct tensor lengths)."""
    return (np.random.Generator(np.random.PCG64([config.seed, n])).integers(0, 2, size=n, dtype=np.int8) * 2 - 1).astype(np.float32)


# Fragments per batch on a GPU: it wants large products. (The CPU kernel signs one fragment at
# a time in reused buffers and batches only the projection.) The cap also keeps the float32
# bincount index (fragment * 255 + q) exact (< 2**24).
_GPU_BATCH = 4096
# Fragments whose max |value| is below 2**-100 are first scaled by 2**100 (exact: a power of two
# on values this small), so levels / scale stays a finite float32 factor; for every other
# fragment the factor and the bits are what they always were.
_TINY = 2.0**-100
_LIFT = 2.0**100


def compute_signatures(
    fragments: list[tuple[bytes | SignatureSample, str]], config: SignatureConfig = SignatureConfig(), device: str | torch.device = "cpu"
) -> list[FragmentSignature]:
    """Signatures of (raw bytes, dtype) fragments (or, on the CPU, their SignatureSample); the same bits on any device. On the CPU a numpy
    kernel over reused per-thread buffers (no torch, no fresh pages in the steady state); on
    another device, torch over batches of equal-length fragments (large matrix products)."""
    if str(device) == "cpu":
        return _cpu_signatures(fragments, config)
    import torch

    out: list[FragmentSignature | None] = [None] * len(fragments)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (data, dt) in enumerate(fragments):
        groups.setdefault((len(data), dt), []).append(i)
    batches = [(key, members[s : s + _GPU_BATCH]) for key, members in groups.items() for s in range(0, len(members), _GPU_BATCH)]
    for (size, dt), idx in batches:
        d = lookup_dtype(dt)
        n = size // d.itemsize
        if n:
            joined = bytearray().join(fragments[i][0] for i in idx)  # one copy, writable for frombuffer
            batch = torch.frombuffer(joined, dtype=d.torch_dtype).reshape(len(idx), n)
        else:
            batch = torch.zeros(len(idx), 0)
        for i, sig in zip(idx, _signature_batch(batch.to(device), config)):
            out[i] = sig
    return out  # type: ignore[return-value]


@dataclass
class _Sketch:
    """What a kernel measures of one fragment; `_finish` turns it into a FragmentSignature."""

    lo: float
    hi: float
    nonfinite: int
    missing: int  # NaN/Inf in the sample
    m: int  # sample length


def _finish(sketches: list[_Sketch], proj: np.ndarray, counts: np.ndarray, config: SignatureConfig) -> list[FragmentSignature]:
    """Signatures from the projections (b x bits) and the exact counts of each q (b x 2L+1).
    All sums are of integers (exact in any order), so both kernels give the same floats."""
    levels = config.levels
    counts = counts.astype(np.int64)
    counts[:, levels] -= [s.missing for s in sketches]  # NaN/Inf were zeroed: not values
    values = np.arange(-levels, levels + 1, dtype=np.int64)
    s1 = (counts @ values).tolist()
    s2 = (counts @ (values * values)).tolist()
    hist = np.zeros((len(sketches), config.histogram_bins), np.int64)
    np.add.at(hist.T, _bin_of(config), counts.T)
    bits = np.packbits(proj > 0, axis=1)
    out = []
    for i, s in enumerate(sketches):
        absmax = max(-s.lo, s.hi, 0.0) + 0.0  # + 0.0: never -0.0
        unit = absmax / levels
        count = max(s.m - s.missing, 1)
        mean_q = float(s1[i]) / count
        var_q = max(float(s2[i]) / count - mean_q * mean_q, 0.0)
        out.append(
            FragmentSignature(
                bits=bits[i].tobytes(),
                scale=absmax,
                mean=mean_q * unit,
                std=float(np.sqrt(var_q)) * unit,
                min=s.lo,
                max=s.hi,
                nonfinite=s.nonfinite,
                histogram=tuple(hist[i].tolist()),
            )
        )
    return out


@lru_cache(maxsize=4)
def _bin_of(config: SignatureConfig) -> np.ndarray:
    """Histogram bin of each q in [-L, L]: floor((q + L) * (bins / (2L + 1))), one float32 multiply."""
    width = 2 * config.levels + 1
    v = np.arange(-config.levels, config.levels + 1, dtype=np.float32) + np.float32(config.levels)
    return np.floor(v * np.float32(config.histogram_bins / width)).astype(np.int64)


def _factor(lo: float, hi: float, levels: int) -> tuple[float, float]:
    """(lift, factor): q = round(x * lift * factor), each product rounded to float32."""
    absmax = max(-lo, hi, 0.0) + 0.0
    lift = _LIFT if 0 < absmax < _TINY else 1.0
    return lift, (levels / (absmax * lift) if absmax > 0 else 0.0)


class _Buffers(threading.local):
    """Per-thread scratch arrays, grown on demand and then reused: a fresh 512 KiB temporary per
    fragment costs page faults that dominated signing (docs/decisions/0037-every-core.md)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dt: type) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or len(a) < n:
            a = self.arrays[name] = np.empty(max(n, 1 << 16), dt)
        return a[:n]


_buffers = _Buffers()


def _as_float32(data: bytes, dt: str, n: int) -> np.ndarray:
    """The fragment's values as float32, exactly as torch's cast makes them: a view for F32,
    else written into a reused buffer (bf16 and fp8 E5M2 are bit shifts, fp16/f64 numpy casts
    with round-to-nearest, fp8 E4M3 a 256-entry table)."""
    if dt == "F32":
        return np.frombuffer(data, np.float32, n)
    out = _buffers.get("x", n, np.float32)
    if dt == "BF16":
        np.left_shift(np.frombuffer(data, np.uint16, n), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dt == "F8_E5M2":  # the high byte of an fp16
        np.left_shift(np.frombuffer(data, np.uint8, n), 8, out=_buffers.get("h", n, np.uint16), dtype=np.uint16)
        np.copyto(out, _buffers.get("h", n, np.uint16).view(np.float16))
    elif dt == "F8_E4M3":
        np.take(_e4m3_table(), np.frombuffer(data, np.uint8, n), out=out)
    else:
        np.copyto(out, np.frombuffer(data, {"F16": np.float16, "F64": np.float64}[dt], n), casting="same_kind")
    return out




def _bounds16(data: bytes, dt: str, n: int) -> tuple[float, float] | None:
    """(min, max) of a BF16 or F16 fragment from integer reductions over its words, without
    converting it: signed, the largest word is the largest non-negative value; unsigned, the
    largest word above 0x8000 is the most negative. None (the float path decides) for other
    dtypes, NaN/Inf, and a bound of zero, whose sign numpy's float min/max leaves to the order
    it meets -0.0 and +0.0. Converting every value cost 4x the rest of a bf16 signature's
    reductions (docs/decisions/0044-one-core-hot-path.md)."""
    if dt not in ("BF16", "F16") or not n:
        return None
    mask = EXPONENT_MASKS[dt][1]
    w = np.frombuffer(data, np.uint16, n)
    top, top_unsigned = int(w.view(np.int16).max()), int(w.max())
    if top >= mask or top_unsigned >= 0x8000 | mask:  # NaN or Inf
        return None
    lowest = None
    if top < 0 or top_unsigned < 0x8000:  # one sign only: the smallest word is the other bound
        lowest = int(w.min())
    hi = top if top >= 0 else lowest
    lo = top_unsigned if top_unsigned >= 0x8000 else lowest
    if not hi & 0x7FFF or not lo & 0x7FFF:
        return None
    return _half_value(lo, dt), _half_value(hi, dt)


def _half_value(bits: int, dt: str) -> float:
    if dt == "BF16":
        return float(np.array([bits << 16], np.uint32).view(np.float32)[0])
    return float(np.array([bits], np.uint16).view(np.float16)[0])


def _sample16(data: bytes, dt: str, n: int, stride: int) -> np.ndarray:
    """Every `stride`-th value of a BF16 or F16 fragment as float32, in a reused buffer."""
    words = np.frombuffer(data, np.uint16, n)[::stride]
    out = _buffers.get("x", len(words), np.float32)
    if dt == "BF16":
        np.left_shift(words, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, words.view(np.float16))
    return out


@lru_cache(maxsize=1)
def _e4m3_table() -> np.ndarray:
    """float32 value of every float8_e4m3fn bit pattern (bias 7, no Inf, NaN at S.1111.111)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * mag).astype(np.float32)


def _bounds_and_sample(data: bytes | SignatureSample, dt: str, config: SignatureConfig) -> tuple[float, float, int, int, np.ndarray]:
    """(least, greatest finite value, NaN/Inf count, NaN/Inf in the sample, the sample with
    those zeroed) of a fragment's values."""
    if isinstance(data, SignatureSample):  # quantized blocks whose sample alone was dequantized
        return data.lo, data.hi, 0, 0, data.values
    n = len(data) // lookup_dtype(dt).itemsize
    nonfinite = missing = 0
    stride = -(-n // config.sample) if n else 1
    bounds = _bounds16(data, dt, n)
    if bounds is not None:  # 16-bit floats: only the sample is converted
        return *bounds, 0, 0, _sample16(data, dt, n, stride)
    x = _as_float32(data, dt, n)
    lo, hi = (float(x.min()), float(x.max())) if n else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # only fragments with NaN/Inf pay for masking
        finite = np.isfinite(x)
        nonfinite = n - int(np.count_nonzero(finite))
        lo = float(np.min(x, where=finite, initial=np.inf))
        hi = float(np.max(x, where=finite, initial=-np.inf))
        missing = int(np.count_nonzero(~finite[::stride]))
        x = np.where(finite, x, np.float32(0))
    return lo, hi, nonfinite, missing, x[::stride]


def _cpu_signatures(fragments: list[tuple[bytes | SignatureSample, str]], config: SignatureConfig) -> list[FragmentSignature]:
    """One fragment at a time through reused buffers; the folded vectors of all fragments meet
    in one matrix product with the projection at the end."""
    levels, fold = config.levels, config.fold
    width = 2 * levels + 1
    folded = np.zeros((len(fragments), fold), np.float32)
    counts = np.zeros((len(fragments), width), np.int64)
    sketches = []
    for i, (data, dt) in enumerate(fragments):
        lo, hi, nonfinite, missing, sample = _bounds_and_sample(data, dt, config)
        m = len(sample)
        lift, factor = _factor(lo, hi, levels)
        q = _buffers.get("q", -(-m // fold) * fold, np.float32)
        if lift != 1.0:
            np.multiply(sample, np.float32(lift), out=q[:m])
            np.multiply(q[:m], np.float32(factor), out=q[:m])
        else:
            np.multiply(sample, np.float32(factor), out=q[:m])
        np.rint(q[:m], out=q[:m])  # round half to even, as torch.round
        index = _buffers.get("i", m, np.intp)
        np.add(q[:m], levels, out=index, casting="unsafe")
        counts[i] = np.bincount(index, minlength=width)
        np.multiply(q[:m], _signs(config, m), out=q[:m])
        q[m:] = 0
        if m <= fold:  # one element per bucket
            folded[i, :m] = q[:m]
        else:
            np.sum(q.reshape(-1, fold), axis=0, out=folded[i])
        sketches.append(_Sketch(lo, hi, nonfinite, missing, m))
    # Partial sums are integers below (sample + fold) * L < 2**24: exact in float32 in any order.
    # One BLAS thread: OpenBLAS's own threads made this product 2-10x slower on a busy machine,
    # and ingest runs one signing thread per core anyway (docs/decisions/0037-every-core.md).
    with _blas().limit(limits=1, user_api="blas"):
        proj = folded @ _projection32(config)
    return _finish(sketches, proj, counts, config)


@lru_cache(maxsize=1)
def _blas():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@lru_cache(maxsize=4)
def _projection32(config: SignatureConfig) -> np.ndarray:
    return _projection(config).astype(np.float32)


def _signature_batch(x: torch.Tensor, config: SignatureConfig) -> list[FragmentSignature]:
    """The kernel for GPUs (and any torch device). float32 is exact where it is used: values are
    converted once (a correctly rounded cast), the quantised q are integers of at most 8 bits,
    and a fold bucket sums at most sample/fold + 1 of them, far below 2**24."""
    import torch

    b, n = x.shape
    x = x.to(torch.float32)
    levels = config.levels
    finite = None
    if n:
        lo, hi = x.amin(1), x.amax(1)  # (aminmax along a dim is 15x slower on CPU)
    if n and not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # only fragments with NaN/Inf pay for masking
        finite = torch.isfinite(x)
        nonfinite = (~finite).sum(1).cpu().tolist()
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
        lo = torch.where(finite, x, inf).amin(1)
        hi = torch.where(finite, x, -inf).amax(1)
        x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    else:
        nonfinite = [0] * b
    mins = lo.cpu().tolist() if n else [0.0] * b
    maxs = hi.cpu().tolist() if n else [0.0] * b
    stride = -(-n // config.sample) if n else 1
    if stride > 1:
        x = x[:, ::stride].contiguous()
        finite = finite[:, ::stride] if finite is not None else None
    m = x.shape[1]
    missing = (~finite).sum(1).cpu().tolist() if finite is not None else [0] * b  # NaN/Inf in the sample
    lifts, factors = zip(*(_factor(a, c, levels) for a, c in zip(mins, maxs))) if b else ((), ())
    if any(f != 1.0 for f in lifts):
        x.mul_(torch.tensor(lifts, dtype=torch.float32, device=x.device)[:, None])
    q = x.mul_(torch.tensor(factors, dtype=torch.float32, device=x.device)[:, None]).round_()  # in place: x is this function's own copy
    counts = torch.bincount((q + levels).to(torch.int32).add_(torch.arange(b, device=x.device, dtype=torch.int32)[:, None] * (2 * levels + 1)).reshape(-1), minlength=b * (2 * levels + 1))
    signed = q * torch.from_numpy(_signs(config, m)).to(device=x.device, dtype=torch.float32)
    # Every partial sum of the projection is an integer below (sample + fold) * L < 2**24, exact
    # in float32 unless the process lets float32 matmuls round to TF32/bf16
    # (torch.set_float32_matmul_precision): then float64.
    exact = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64
    projection = _projection_on(config, x.device, exact)
    if m <= config.fold:  # one element per bucket: zero padding adds nothing, so project m rows only
        proj = signed.to(exact) @ projection[:m]
    else:
        pad = (-m) % config.fold
        if pad:
            signed = torch.nn.functional.pad(signed, (0, pad))
        proj = signed.reshape(b, -1, config.fold).sum(1).to(exact) @ projection
    sketches = [_Sketch(mins[i], maxs[i], int(nonfinite[i]), int(missing[i]), m) for i in range(b)]
    return _finish(sketches, proj.cpu().numpy(), counts.reshape(b, -1).cpu().numpy(), config)
