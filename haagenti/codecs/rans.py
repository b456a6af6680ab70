"""Quantized GGUF blocks entropy-coded under models stored in the fragment: codec `rans`
(format 9, constriction's range coder; read) and `rans2` (format 10, the table-driven rANS of
haagenti/codecs/ans.py; written), the same models and symbol order.

zstd stores a block's code plane raw whenever Huffman saves under ~1.6% (every Q8_0 and Q4
code plane), and codes each scale byte plane on its own. Here each field gets a semi-static
model instead: a histogram per context, kept in the fragment, and the symbols of a context
coded in one vectorised call. An fp16 scale is taken in the order of its magnitude and split
into a coarse and a fine part (its density is smooth, so a few dozen coarse bins and one fine
histogram cost little); a second scale (Q4_1's min) may be coded relative to the first; fields
after the first are modelled per class of the first (codes spread less in a block whose scale
is large). Measured in docs/decisions/0350-quantized-range-coder.md and 0380-table-rans.md.
"""
from __future__ import annotations

import struct

import constriction
import numpy as np
import zstandard

from haagenti.errors import FragmentError

CLASSES = 8  # classes of the first field's values (its octiles); a stream uses 1, 2, 4 or 8 of them
MAX_SHIFT = 12  # a scale's fine part has at most 2^12 symbols ...
MAX_COARSE = 4096  # ... and its coarse part at most 4096
MODEL_BITS = 5.0  # what a histogram entry costs once zstd has the models, about (to choose models with)
HEADER_LEVEL = 6  # zstd level of the models (a few hundred bytes: the level costs nothing measurable)
MIXED = 2  # a scale field's sign mode: 0 all positive, 1 all negative, 2 either (Q4_0's scale)


def _order(words: np.ndarray) -> tuple[int, np.ndarray]:
    """(sign mode, fp16 bit patterns as integers in the order of their magnitudes): a scale's
    size is what its neighbours share and what spreads its block's codes. Signs alike are
    stored once; mixed, each is the lowest bit."""
    words = words.astype(np.int64)
    signs = words >> 15
    mode = int(signs[0]) if len(words) and (signs == signs[0]).all() else MIXED
    return mode, ((words & 0x7FFF) << 1) | signs if mode == MIXED else words & 0x7FFF


def _unorder(mode: int, u: np.ndarray) -> np.ndarray:
    if mode == MIXED:
        return ((u >> 1) | ((u & 1) << 15)).astype("<u2")
    return (u | (mode << 15)).astype("<u2")


# A histogram entry's weight by its stored level: 0, then 16 x 2^((level - 1) / 3) rounded, a
# step of 26% over 1 : 1024 (level 31 the most frequent symbol). Integers, so that the coder's
# model is the same on every machine; a level stored beyond the table is damage.
WEIGHTS = np.array([0, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128, 161, 203, 256, 323, 406, 512, 645, 813, 1024, 1290,
                    1625, 2048, 2580, 3251, 4096, 5161, 6502, 8192, 10321, 13004, 16384], np.int64)
LEVELS_PER_OCTAVE = 3


_SIGNED = np.abs(np.arange(256).astype(np.uint8).view(np.int8).astype(np.int64))  # |int8| of each byte


class _Stream:
    """Symbols of one field part (rows: blocks; columns: bytes per block), coded under a
    histogram per class of the first field. The histogram is over the bytes themselves ("b"),
    over the two 4-bit codes of each byte, the byte's weight their product ("n": the codes are
    independent), or over |int8| of each byte, both signs weighing the same ("i": codes
    around zero, half the model)."""

    def __init__(self, alphabet: int, kind: str = "b"):
        self.alphabet, self.kind = alphabet, kind
        self.hist_len = {"b": alphabet, "n": 16, "i": 129}[kind]

    def weights(self, levels: np.ndarray) -> np.ndarray:
        """Every byte's integer weight under the histogram of these levels (the last axis)."""
        q = WEIGHTS[levels]
        if self.kind == "n":  # byte b = low nibble + 16 x high: q[b >> 4] * q[b & 15]
            return (q[..., :, None] * q[..., None, :]).reshape(*q.shape[:-1], 256)
        return q[..., _SIGNED] if self.kind == "i" else q

    def choose(self, symbols: np.ndarray, classes: _Classes | None) -> tuple[int, np.ndarray]:
        """(classes used, their histograms as levels): the smallest estimate of coded bits plus
        models over every grouping of the classes (1, 2, 4 or 8), from one count of symbols by
        class."""
        from haagenti.codecs.search import best_models, counts_by_class  # numba: imported when first used

        of = classes.of if classes is not None else np.zeros(len(symbols), np.int64)
        kind = "bni".index(self.kind)
        by_class = counts_by_class(symbols, of, kind, self.hist_len, CLASSES)
        return best_models(by_class if classes is not None else by_class[:1], kind, WEIGHTS, LEVELS_PER_OCTAVE, MODEL_BITS)

    def encode(self, coder, symbols: np.ndarray, classes: _Classes | None, k: int, hists: np.ndarray) -> None:
        if self.hist_len == 1:  # a one-symbol alphabet costs nothing to code
            return
        bounds = _bounds(classes, k, len(symbols))
        ordered = symbols if k == 1 else symbols[classes.order]
        for c, q in enumerate(hists):
            if bounds[c + 1] > bounds[c]:
                coder.encode(ordered[bounds[c] : bounds[c + 1]], self.weights(q))

    def decode(self, coder, out: np.ndarray, classes: _Classes | None, k: int, hists: np.ndarray) -> None:
        """Fills out (blocks x width) with the stream's symbols. A histogram has as many symbols
        as the alphabet, so no coder decodes a symbol outside it."""
        if self.hist_len == 1:
            out[...] = 0
            return
        sizes = classes.sizes(k) if k > 1 else np.array([len(out)])
        if ((hists.max(axis=1) == 0) & (sizes > 0)).any():
            raise _damaged("a stream has symbols in a class whose histogram is empty")
        try:
            coder.decode_rows(self.weights(hists), sizes, classes.order if k > 1 else None, out)
        except (AssertionError, ValueError, RuntimeError, OverflowError) as e:  # what the coders raise on words they cannot decode (constriction's AssertionError: invalid for the model)
            raise _damaged(f"its coded words do not decode: {e}") from None


class _Classes:
    """Every block's class (how many of the 7 edges its first field's value reaches: its
    octile) and the blocks in class order (stable): a stream of k classes codes class c's
    blocks, in block order, before c + 1's, so its part c is the run
    `order[bounds[c] : bounds[c + 1]]`."""

    def __init__(self, edges: np.ndarray, first: np.ndarray):
        from haagenti.codecs.search import classify  # numba: imported when first used

        self.of, self.order, self.counts = classify(first, edges.astype(np.int64), CLASSES)

    def sizes(self, k: int) -> np.ndarray:
        """Blocks per class of a stream of k classes."""
        return self.counts.reshape(k, -1).sum(axis=1)


def _octiles(values: np.ndarray) -> np.ndarray:
    """np.quantile(values, [1/8 .. 7/8], method="lower"), by one partial sort."""
    at = np.floor(np.arange(1, CLASSES) / CLASSES * (len(values) - 1)).astype(np.int64)
    return np.partition(values, at)[at]


def _bounds(classes: _Classes | None, k: int, rows: int) -> np.ndarray:
    return np.array([0, rows]) if k == 1 else np.concatenate([[0], np.cumsum(classes.sizes(k))])


def _damaged(what: str) -> FragmentError:
    return FragmentError(f"range-coded blocks are damaged: {what}")


class _RangeEncoder:
    """constriction's range coder (codec `rans`, format 9): models from float weights, which
    its pinned release quantizes."""

    def __init__(self) -> None:
        self.coder = constriction.stream.queue.RangeEncoder()

    def encode(self, symbols: np.ndarray, weights: np.ndarray) -> None:
        self.coder.encode(symbols.astype(np.int32).ravel(), _categorical(weights))

    def finish(self) -> bytes:
        return self.coder.get_compressed().tobytes()


class _RangeDecoder:
    def __init__(self, words: memoryview):
        if len(words) % 4:
            raise _damaged("its coded words are not whole 32-bit words")
        self.coder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, np.uint32).copy())

    def decode_rows(self, weights: np.ndarray, sizes: np.ndarray, order: np.ndarray | None, out: np.ndarray) -> None:
        width = out.shape[1]
        parts = [self.coder.decode(_categorical(w), int(n) * width) for w, n in zip(weights, sizes) if n]
        symbols = np.concatenate(parts).reshape(-1, width) if parts else np.zeros(out.shape, np.int32)
        if order is None:
            out[...] = symbols
        else:
            out[order] = symbols

    def finish(self) -> None:
        """constriction's stream has no end marker to check."""


def _categorical(weights: np.ndarray):
    return constriction.stream.model.Categorical(weights.astype(np.float64), perfect=False)


class _TableEncoder:
    def __init__(self) -> None:
        from haagenti.codecs.ans import Encoder  # numba: imported when first used

        self.coder = Encoder()

    def encode(self, symbols: np.ndarray, weights: np.ndarray) -> None:
        self.coder.encode(symbols, weights)

    def finish(self) -> bytes:
        return self.coder.finish()


class _TableDecoder:
    def __init__(self, words: memoryview):
        from haagenti.codecs.ans import DamagedStream, Decoder  # numba: imported when first used

        self.damage = DamagedStream
        try:
            self.coder = Decoder(words)
        except DamagedStream as e:
            raise _damaged(str(e)) from None

    def decode_rows(self, weights: np.ndarray, sizes: np.ndarray, order: np.ndarray | None, out: np.ndarray) -> None:
        self.coder.decode_rows(weights, sizes, np.arange(len(out)) if order is None else order, out)

    def finish(self) -> None:
        try:
            self.coder.finish()
        except self.damage as e:
            raise _damaged(str(e)) from None


# The coders by spec name: `rans` (format 9) constriction's range coder, `rans2` (format 10)
# the table-driven rANS, ~10x faster both ways (docs/decisions/0380-table-rans.md).
CODERS = {"rans": (_RangeEncoder, _RangeDecoder), "rans2": (_TableEncoder, _TableDecoder)}


class _Reader:
    """The models' bytes read front to back; running short is a damaged fragment."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from(fmt, self.data, self.pos)
        except struct.error:
            raise _damaged("its models end early") from None
        self.pos += struct.calcsize(fmt)
        return out

    def bytes(self, n: int) -> np.ndarray:
        if self.pos + n > len(self.data):
            raise _damaged("its models end early")
        out = np.frombuffer(self.data, np.uint8, n, self.pos)
        self.pos += n
        return out


def _fields(text: str) -> list[tuple[str, int]]:
    """"s2.s2.n16" -> [("s", 2), ("s", 2), ("n", 16)] (QUANTIZED_FIELDS' letters); the first
    field (s2 or b1) gives the classes."""
    parts = text.split(".")
    if not all(len(f) > 1 and f[1:].isdigit() for f in parts):
        raise ValueError(text)
    fields = [(f[0], int(f[1:])) for f in parts]
    ok = 0 < len(fields) <= 16 and all(k in "sbniq" and 0 < w <= 256 and (k != "s" or w == 2) and (k != "q" or w == 20) for k, w in fields)
    if not ok or fields[0] not in (("s", 2), ("b", 1)):
        raise ValueError(text)
    return fields


def _scale_plan(u: np.ndarray, base: np.ndarray | None) -> tuple[float, int, int, np.ndarray, np.ndarray, int]:
    """(estimated bits, shift, least, coarse symbols, fine symbols, relative) of a scale field
    coded on its own (base None: v = u less its least, coarse v >> shift, fine its low `shift`
    bits) or relative to the first scale field (coarse u >> shift less base >> shift, less the
    least of those; fine u's low bits), at the shift of the smallest estimate: every other
    shift of at most 512 coarse symbols (more cost more in models than they save on 4,096
    blocks), then the best one's neighbours."""
    from haagenti.codecs.search import best_shift  # numba: imported when first used

    v = u if base is not None or not len(u) else u - u.min()
    s, cost = best_shift(u, v, base if base is not None else v, base is not None, MAX_SHIFT, MODEL_BITS)
    c = (u >> s) - (base >> s) if base is not None else v >> s
    if base is None:
        return cost, s, int(u.min()) if len(u) else 0, c, v & ((1 << s) - 1), 0
    low = int(c.min()) if len(c) else 0
    return cost, s, low, c - low, u & ((1 << s) - 1), 1


class QuantizedBlocks:
    """The codec: spec `rans:FIELDS`, FIELDS the block's fields in order (QUANTIZED_FIELDS)."""

    def __init__(self, name: str, text: str):
        self.fields = _fields(text)
        self.width = sum(w for _, w in self.fields)
        self.spec = f"{name}:{text}"
        self.encoder, self.decoder = CODERS[name]
        self._z = zstandard.ZstdCompressor(level=HEADER_LEVEL)

    def encode(self, data: bytes | memoryview) -> bytes:
        src = np.frombuffer(data, np.uint8)
        blocks = len(src) // self.width
        rows = src[: blocks * self.width].reshape(blocks, self.width)
        tail = src[blocks * self.width :].tobytes()
        head = [struct.pack("<IB", blocks, len(tail)), tail]
        coder = self.encoder()
        classes = None
        at = 0
        for kind, w in self.fields:
            cols = rows[:, at : at + w]
            at += w
            if kind == "s":
                mode, values = _order(cols.copy().view("<u2")[:, 0])
                head.append(bytes([mode]) + self._encode_scale(coder, values, classes, first if classes is not None and self.fields[0][0] == "s" else None))
            else:
                if kind == "q":
                    cols = _five_bit_codes(cols)
                stream = _Stream(32 if kind == "q" else 256, "b" if kind == "q" else kind)
                k, hists = stream.choose(cols, classes)
                stream.encode(coder, cols, classes, k, hists)
                head.append(_models(k, hists))
                values = cols[:, 0].astype(np.int64)
            if classes is None:  # the first field: its octiles class every block for the rest
                first = values
                edges = _octiles(first).astype("<u2") if blocks else np.zeros(CLASSES - 1, "<u2")
                head.append(edges.tobytes())
                classes = _Classes(edges, first)
        models = self._z.compress(b"".join(head))
        return struct.pack("<I", len(models)) + models + coder.finish()

    def _encode_scale(self, coder, u: np.ndarray, classes: _Classes | None, base: np.ndarray | None) -> bytes:
        """A scale field as a coarse part and a fine part (its low `shift` bits), on its own
        (coarse u >> shift less its least) or, for a field after a first scale `base`, relative
        to it (coarse u >> shift less base >> shift, less the least of those: a min's size
        follows its block's scale, and one histogram then does what one per class did); the
        smaller estimate of bits plus models."""
        plans = [_scale_plan(u, None)] + ([_scale_plan(u, base)] if base is not None and len(u) else [])
        _, s, low, coarse, fine, relative = min(plans, key=lambda p: p[0])
        top = int(coarse.max()) if len(coarse) else 0
        head = [struct.pack("<BiBH", relative, low, s, top)]
        for part, stream in ((coarse, _Stream(top + 1)), (fine, _Stream(1 << s))):
            k, hists = stream.choose(part[:, None], classes)
            stream.encode(coder, part[:, None], classes, k, hists)
            head.append(_models(k, hists))
        return b"".join(head)

    def decode(self, data: bytes | memoryview, limit: int) -> bytes:
        view = memoryview(data)
        if len(view) < 4:
            raise _damaged("shorter than its header")
        (size,) = struct.unpack_from("<I", view)
        head = _Reader(_unpack_models(view[4 : 4 + size], limit))
        blocks, n_tail = head.take("<IB")
        if blocks * self.width + n_tail > limit:
            raise _damaged(f"decodes to {blocks * self.width + n_tail} bytes, more than the {limit} recorded")
        tail = head.bytes(n_tail).tobytes()
        coder = self.decoder(view[4 + size :])
        rows = np.empty((blocks, self.width), np.uint8)
        classes = None
        at = 0
        for kind, w in self.fields:
            if kind == "s":
                mode, relative, low, s, coarse = head.take("<BBiBH")
                if mode > MIXED or relative > int(classes is not None and self.fields[0][0] == "s") or s > MAX_SHIFT or coarse >= MAX_COARSE:
                    raise _damaged(f"a scale's sign mode {mode}, relative flag {relative}, shift {s} or coarse alphabet {coarse + 1} is out of bounds")
                hi = _decode_stream(head, coder, _Stream(coarse + 1), np.empty((blocks, 1), np.int64), classes)[:, 0]
                fine = _decode_stream(head, coder, _Stream(1 << s), np.empty((blocks, 1), np.int64), classes)[:, 0]
                values = ((hi + low + (first >> s)) << s) | fine if relative else low + ((hi << s) | fine)
                if blocks and not 0 <= int(values.min()) <= int(values.max()) <= (0xFFFF if mode == MIXED else 0x7FFF):
                    raise _damaged("a scale is out of its 16 bits")
                rows[:, at : at + 2] = _unorder(mode, values).view(np.uint8).reshape(blocks, 2)
            elif kind == "q":
                rows[:, at : at + w] = _five_bit_fields(_decode_stream(head, coder, _Stream(32), np.empty((blocks, 32), np.uint8), classes))
            else:
                values = _decode_stream(head, coder, _Stream(256, kind), rows[:, at : at + w], classes)[:, 0].astype(np.int64)
            at += w
            if classes is None:
                first = values
                edges = np.frombuffer(head.bytes(2 * (CLASSES - 1)).tobytes(), "<u2")
                classes = _Classes(edges, first)
        if head.pos != len(head.data):
            raise _damaged("its models have bytes left over")
        coder.finish()
        return rows.tobytes() + tail


def _five_bit_codes(fields: np.ndarray) -> np.ndarray:
    """Q5's 32 codes of each block from its fields (qh: 4 bytes of fifth bits, bit j for code j;
    qs: 16 bytes, code j < 16 the low nibble of byte j, code j + 16 its high nibble)."""
    qs = fields[:, 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=1)
    return codes | (np.unpackbits(fields[:, :4], axis=1, bitorder="little") << 4)


def _five_bit_fields(codes: np.ndarray) -> np.ndarray:
    """The inverse of _five_bit_codes."""
    codes = codes.astype(np.uint8)
    qh = np.packbits(codes >> 4, axis=1, bitorder="little")
    return np.concatenate([qh, (codes[:, :16] & 15) | ((codes[:, 16:] & 15) << 4)], axis=1)


def _models(k: int, hists: np.ndarray) -> bytes:
    """A stream's class count and histograms, each as differences of neighbours (mod 256):
    histograms are smooth, and zstd then finds the small values."""
    q = np.asarray(hists, np.uint8).reshape(k, -1)
    steps = q.copy()
    steps[:, 1:] -= q[:, :-1]
    return bytes([k]) + steps.tobytes()


def _decode_stream(head: _Reader, coder, stream: _Stream, out: np.ndarray, classes: _Classes | None) -> np.ndarray:
    """Reads a stream's models and fills `out` (blocks x width) with its symbols; returns out."""
    (k,) = head.take("<B")
    if k not in ((1, 2, 4, 8) if classes is not None else (1,)):
        raise _damaged(f"a stream names {k} classes")
    hists = np.cumsum(head.bytes(k * stream.hist_len).reshape(k, stream.hist_len), axis=1, dtype=np.uint8).astype(np.int64)
    if int(hists.max()) >= len(WEIGHTS):
        raise _damaged(f"a histogram level is beyond the {len(WEIGHTS)} levels")
    stream.decode(coder, out, classes, k, hists)
    return out


def _unpack_models(models: memoryview, limit: int) -> bytes:
    """The models' zstd frame, refused when it claims more than a fragment's models can be."""
    bound = 64 + 16 * (1 + CLASSES * (MAX_COARSE + (1 << MAX_SHIFT))) + limit // 8
    try:
        size = zstandard.frame_content_size(models)
        if not 0 <= size <= bound:
            raise _damaged(f"its models claim {size} bytes")
        return zstandard.ZstdDecompressor().decompress(models)
    except zstandard.ZstdError as e:
        raise _damaged(f"its models do not decompress: {e}") from None


# The fields of the GGUF types this codec models (ggml-common.h's block order): "s2" an fp16
# scale or min, "iN" N int8 codes, "nN" N bytes of two 4-bit codes each, "q20" Q5's fifth bits
# and low nibbles (32 codes of 5 bits), "bN" N bytes (MXFP4's e8m0 scale). What each gains over
# the planes: docs/decisions/0350-quantized-range-coder.md.
QUANTIZED_FIELDS = {
    "Q8_0": "s2.i32",
    "Q4_0": "s2.n16",
    "Q4_1": "s2.s2.n16",
    "Q5_0": "s2.q20",
    "Q5_1": "s2.s2.q20",
    "MXFP4": "b1.n16",
}
