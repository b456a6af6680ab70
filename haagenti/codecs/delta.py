"""Lossless deltas of a fragment against a reference fragment.

Two residuals are tried and the smaller kept: XOR of the bit patterns (a fine-tune keeps
sign, exponent and high mantissa bits, so the XOR is mostly zero bits, as in ZipLLM/BitX)
and the wrapping integer difference of the words (smaller when values move by a few ulps
across a carry). Both are exact, so restore is bit-exact whatever the reference is.
"""
from __future__ import annotations

import threading

import numpy as np

from haagenti.codecs.cast import cast
from haagenti.codecs.core import PLANES, chain_choices, encode_smallest
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.fragment import Encoding

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def cast_reference(ref: bytes, ref_dtype: str, target_dtype: str) -> bytes:
    """The reference's values in the target dtype (e.g. a bf16 base cast to fp16), so a re-export
    is stored as the small residual of the cast (haagenti.codecs.cast: IEEE round-to-nearest,
    torch's bits, numpy's speed)."""
    return ref if ref_dtype == target_dtype else cast(ref, ref_dtype, target_dtype)


def _words(data: bytes, itemsize: int) -> np.ndarray:
    """Words of the item size; bytes for items of another size (a quantized block)."""
    return np.frombuffer(data, dtype=_UINT.get(itemsize, np.uint8))


_scratch = threading.local()


def residual(encoding: Encoding, raw: bytes, ref: bytes, itemsize: int) -> memoryview:
    """The residual, in a buffer this thread reuses on its next call: encode it before then."""
    a, b = _words(raw, itemsize), _words(ref, itemsize)
    buf = getattr(_scratch, "words", None)
    if buf is None or buf.nbytes < len(raw):
        buf = _scratch.words = np.empty(max(len(raw), 1 << 18), np.uint8)
    out = buf[: len(raw)].view(a.dtype)
    if encoding is Encoding.DELTA_XOR:
        np.bitwise_xor(a, b, out=out)
    else:
        np.subtract(a, b, out=out)  # unsigned arithmetic wraps: exact and invertible
    return memoryview(out).cast("B")


def apply_delta(encoding: Encoding, res: bytes | memoryview, ref: bytes, itemsize: int) -> memoryview:
    """raw from a residual: in place when the residual is a writable buffer of its own (what a
    codec chain's decode returns), so a delta costs no allocation on restore."""
    a, b = _words(res, itemsize), _words(ref, itemsize)
    out = a if a.flags.writeable else None
    if encoding is Encoding.DELTA_XOR:
        return memoryview(np.bitwise_xor(a, b, out=out)).cast("B")
    return memoryview(np.add(a, b, out=out)).cast("B")


# Fragments of at least 4 x PROBE_WORDS words are ranked by the encoded size of their first
# PROBE_WORDS words and only the leader is encoded whole: full encodes of every option were a
# third of the zstd time of an ingest with similarity (measurements in docs/decisions/0009-deltas.md).
PROBE_WORDS = 16384
# ...except that plain is encoded whole too unless the leading delta's probe is at most this
# share of plain's: a near tie on a probe is no verdict on the whole fragment.
CLEAR_LEAD = 0.9


def smallest_encoding(raw: bytes, refs: list[bytes], dtype_name: str, level: int | str = PLANES) -> tuple[Encoding, int | None, str, bytes]:
    """(encoding, index of the reference used or None, codec spec, blob): the smallest of `raw`
    itself and its XOR and difference residuals against each reference (already cast to
    `raw`'s dtype), each coded with every chain of `chain_choices`. On long fragments with
    references the (option, chain) pairs are ranked on a probe and only the finalists are
    computed whole; a long fragment without references takes the dtype's chain (each of them,
    for quantized blocks). Quantized blocks with references rank the options by the dtype's
    chain and code only the leader and plain with the others."""
    d = lookup_dtype(dtype_name)
    chains = chain_choices(dtype_name, level)
    plain: tuple[Encoding, int | None] = (Encoding.PLAIN, None)
    options = [plain] + [(enc, i) for i in range(len(refs)) for enc in (Encoding.DELTA_XOR, Encoding.DELTA_SUB)]

    def body(enc: Encoding, i: int | None, stop: int | None = None) -> bytes:
        return raw[:stop] if i is None else residual(enc, raw[:stop], refs[i][:stop], d.itemsize)

    if d.block > 1 and len(options) > 1:
        # quantized blocks with references: the options ranked by their planes, the other
        # chains (the range coder, ~5x the planes' time to encode) tried on the leader and plain only
        ranked = [(enc, i, *encode_smallest(body(enc, i), chains[0])) for enc, i in options]
        lead = min(ranked, key=lambda e: len(e[3]))[:2]
        ranked += [(enc, i, *encode_smallest(body(enc, i), chains[k])) for enc, i in dict.fromkeys([plain, lead]) for k in range(1, len(chains))]
        return min(ranked, key=lambda e: len(e[3]))
    probe = PROBE_WORDS * d.itemsize
    pairs = [(o, k) for o in options for k in range(len(chains))]
    if len(raw) < 4 * probe:
        finalists = pairs
    elif len(options) == 1:  # quantized blocks try every chain: the range coder beats the planes on most types, not all
        finalists = [(plain, k) for k in range(len(chains) if d.block > 1 else 1)]
    else:
        sizes = {(o, k): len(chains[k].encode(body(*o, probe))) for o, k in pairs}
        lead = min(pairs, key=lambda p: sizes[p])  # the first of equals: plain wins ties
        best_plain = min(((plain, k) for k in range(len(chains))), key=lambda p: sizes[p])
        finalists = [lead] if sizes[lead] <= CLEAR_LEAD * sizes[best_plain] else list(dict.fromkeys([best_plain, lead]))
    encoded = [(enc, i, *encode_smallest(body(enc, i), chains[k])) for (enc, i), k in finalists]
    return min(encoded, key=lambda e: len(e[3]))
