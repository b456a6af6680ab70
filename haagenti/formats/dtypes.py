"""The safetensors dtype table: name, item size and the torch dtype used to view values.

torch is named here, not imported: only signatures, casts and checkpoints need it, and its
import (~1.1 s) would otherwise be paid by every CLI command and every pipeline worker."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from haagenti.errors import FormatError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling, e.g. "BF16"
    itemsize: int
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"; "" for quantized blocks
    is_float: bool
    block: int = 1  # values per item: 1, or a quantized type's block (Q8_0: 32), whose item is a whole block

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        if not self.torch_name:
            raise FormatError(f"{self.name} tensors are quantized blocks: they have no torch dtype (restore the file instead)")
        return getattr(torch, self.torch_name)

    def fragment_items(self, fragment_elements: int) -> int:
        """Items per fragment: `fragment_elements` values, so a fragment covers the same values
        whatever the dtype, and quantized tensors are cut on block boundaries."""
        return max(1, fragment_elements // self.block)


_DTYPES = [
    DType("F64", 8, "float64", True),
    DType("F32", 4, "float32", True),
    DType("F16", 2, "float16", True),
    DType("BF16", 2, "bfloat16", True),
    DType("F8_E4M3", 1, "float8_e4m3fn", True),
    DType("F8_E5M2", 1, "float8_e5m2", True),
    # Stored and restored as bytes, never compared as floats: E8M0 (MX block scales) is an
    # exponent alone, and complex values are pairs; neither feeds signatures or deltas.
    DType("F8_E8M0", 1, "float8_e8m0fnu", False),
    DType("C64", 8, "complex64", False),
    DType("I64", 8, "int64", False),
    DType("I32", 4, "int32", False),
    DType("I16", 2, "int16", False),
    DType("I8", 1, "int8", False),
    DType("U64", 8, "uint64", False),
    DType("U32", 4, "uint32", False),
    DType("U16", 2, "uint16", False),
    DType("U8", 1, "uint8", False),
    DType("BOOL", 1, "bool", False),
]
BY_NAME = {d.name: d for d in _DTYPES}
BY_TORCH_NAME = {d.torch_name: d for d in _DTYPES}


def dtype(name: str) -> DType:
    d = BY_NAME.get(name) or quantized().get(name)
    if d is None:
        raise FormatError(f"unsupported dtype {name!r} (known: {', '.join(BY_NAME)} and GGUF's quantized types)")
    return d


@lru_cache(maxsize=1)
def quantized() -> dict[str, DType]:
    """GGUF's quantized types (Q8_0, Q4_K, IQ4_XS, ...) by name, from the gguf package's own
    table: an item is one block of `block_size` values in `type_size` bytes."""
    from gguf.constants import GGML_QUANT_SIZES

    return {
        t.name: DType(t.name, type_size, "", False, block_size)
        for t, (block_size, type_size) in GGML_QUANT_SIZES.items()
        if block_size > 1
    }


def from_torch(t: "torch.dtype") -> DType:
    try:
        return BY_TORCH_NAME[str(t).removeprefix("torch.")]
    except KeyError:
        raise FormatError(f"unsupported torch dtype {t}") from None


# (word type, exponent mask): a float is NaN or Inf exactly when all its exponent bits are set.
# float8_e4m3fn has no Inf and one NaN pattern per sign (0x7F/0xFF), hence the full mask.
EXPONENT_MASKS = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),
    "C64": (np.uint32, 0x7F800000),  # a pair of F32 words
}
_SIGNED = {np.uint8: np.int8, np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}


def has_nonfinite(data: bytes, d: DType) -> bool:
    """Whether raw little-endian values hold a NaN or Inf, from bit patterns (any float dtype).
    A value is NaN or Inf exactly when its bits without the sign are >= the exponent mask: for
    positive values that is the largest of the words read as signed integers, for negative ones
    the largest read as unsigned, less the sign bit. Two reductions over views of the data, no
    temporary (an AND into a fresh array, then a max, cost 1.5x as much: docs/decisions/0044-one-core-hot-path.md)."""
    spec = EXPONENT_MASKS.get(d.name)
    if spec is None or not data:
        return False
    word, mask = spec
    w = np.frombuffer(data, dtype=word)
    sign = word(1 << (8 * w.itemsize - 1))
    return bool(w.view(_SIGNED[word]).max() >= mask or w.max() >= sign | word(mask))


@lru_cache(maxsize=None)
def can_dequantize(d: DType) -> bool:
    """Whether gguf can turn blocks of this quantized type back into values."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, d.itemsize), np.uint8), GGMLQuantizationType[d.name])
    except NotImplementedError:
        return False
    return True


@dataclass(frozen=True)
class SignatureSample:
    """What a signature reads of a fragment, without the rest of its values: their least and
    greatest, and every `stride`-th of them as float32 (the sample)."""

    lo: float
    hi: float
    values: np.ndarray


# The legacy GGUF types, whose value j of a block is d * (code_j - offset) [+ m] in float32 as
# gguf dequantizes them: (code bits, offset, has a min).
_LEGACY = {"Q8_0": (8, 0, False), "Q4_0": (4, 8, False), "Q4_1": (4, 0, True), "Q5_0": (5, 16, False), "Q5_1": (5, 0, True)}


def signable(data: bytes, d: DType, sample: int | None = None) -> tuple[bytes | SignatureSample, str]:
    """The values a signature is computed on: a float fragment's own bytes, or a quantized
    fragment's blocks dequantized to F32 by gguf (so a fine-tune's Q8_0 blocks find the base's
    as delta references), or int8/uint8 codes less their median as F32: linear quantization's
    codes less its zero point are the values over a scale, which a signature does not see, so
    an ONNX int8/uint8 weight finds its float source (haagenti.codecs.predict). With `sample`
    (the signature's sample size; the CPU kernel), legacy blocks with finite scales are given as
    a SignatureSample: only the sample is dequantized (docs/decisions/0350-quantized-range-coder.md)."""
    if d.name in ("I8", "U8"):
        codes = np.frombuffer(data, np.int8 if d.name == "I8" else np.uint8).astype(np.float32)
        return (codes - np.median(codes)).tobytes(), "F32"
    if d.block == 1:
        return data, d.name
    if sample is not None and d.name in _LEGACY and len(data) % d.itemsize == 0:
        sketch = _legacy_sample(np.frombuffer(data, np.uint8).reshape(-1, d.itemsize), *_LEGACY[d.name], sample)
        if sketch is not None:
            return sketch, "F32"
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    # One row of all the blocks: gguf dequantizes a row's blocks in one numpy pass but calls
    # Python per 16 rows, so a block per row cost a call per 16 blocks (docs/decisions/0280-quantized-blocks.md).
    values = dequantize(np.frombuffer(data, np.uint8).reshape(1, -1), GGMLQuantizationType[d.name])
    return np.ascontiguousarray(values, np.float32).tobytes(), "F32"


def _legacy_sample(blocks: np.ndarray, bits: int, offset: int, has_min: bool, sample: int) -> SignatureSample | None:
    """The bounds and sample of legacy blocks, the same floats gguf's dequantize gives, or None
    when a scale is NaN/Inf (the full path masks those). A block's values are d * q (+ m) in
    float32, monotone in q, so its bounds are at its least and greatest code."""
    if not len(blocks):
        return SignatureSample(0.0, 0.0, np.zeros(0, np.float32))
    scales = blocks[:, : 4 if has_min else 2].copy().view(np.float16).astype(np.float32)
    if not np.isfinite(scales).all():
        return None
    d, m = scales[:, 0], (scales[:, 1] if has_min else None)
    rest = blocks[:, 4 if has_min else 2 :]
    # codes[j, b]: value j of block b; a block's least code is then elementwise minima of 32
    # rows, where a minimum along each block's 32 bytes cost numpy a call per block (~20x)
    if bits == 8:
        codes = np.ascontiguousarray(rest.view(np.int8).T)
    else:
        qs = np.ascontiguousarray(rest[:, -16:].T)
        codes = np.concatenate([qs & 15, qs >> 4])  # value j < 16: low nibble of byte j
        if bits == 5:
            codes |= np.unpackbits(rest[:, :4], axis=1, bitorder="little").T << 4  # bit j of qh: value j's fifth
    n = codes.size
    stride = -(-n // sample)

    def value(q: np.ndarray, at: np.ndarray | slice) -> np.ndarray:
        x = d[at] * (q.astype(np.float32) - np.float32(offset))  # code - offset is exact in float32, as gguf's int8
        return x + m[at] if m is not None else x

    ends = np.concatenate([value(codes.min(axis=0), slice(None)), value(codes.max(axis=0), slice(None))])
    where = np.arange(0, n, stride)
    return SignatureSample(float(ends.min()), float(ends.max()), value(codes[where % 32, where // 32], where // 32))


def castable(src: str, dst: str) -> bool:
    """Whether a fragment of dtype `src` can serve as a delta reference for one of `dst`: the
    same dtype, or two float dtypes (the reference is cast first). Quantized blocks only
    reference blocks of their own type."""
    a, b = dtype(src), dtype(dst)
    return src == dst or (a.is_float and b.is_float and a.block == b.block == 1)
