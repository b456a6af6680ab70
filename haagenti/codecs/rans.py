"""Quantized GGUF blocks range-coded under models stored in the fragment (constriction).

zstd stores a block's code plane raw whenever Huffman saves under ~1.6% (every Q8_0 and Q4
code plane), and codes each scale byte plane on its own. Here each field gets a semi-static
model instead: a histogram per context, kept in the fragment, and the symbols of a context
coded in one vectorised call. An fp16 scale is taken in the order of its magnitude and split
into a coarse and a fine part (its density is smooth, so a few dozen coarse bins and one fine
histogram cost little); a second scale (Q4_1's min) may be coded relative to the first; fields
after the first are modelled per class of the first (codes spread less in a block whose scale
is large). Measured in docs/decisions/0350-quantized-range-coder.md.
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


def _levels(counts: np.ndarray) -> np.ndarray:
    """Histograms (rows) as levels of WEIGHTS, each row's most frequent symbol at the top one;
    a present symbol never gets 0."""
    top = np.maximum(counts.max(axis=-1, keepdims=True), 1)
    with np.errstate(divide="ignore"):
        level = np.rint(LEVELS_PER_OCTAVE * np.log2(counts / top)) + len(WEIGHTS) - 1
    return np.where(counts > 0, np.clip(level, 1, len(WEIGHTS) - 1), 0).astype(np.int64)


def _row_bits(counts: np.ndarray, q: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """What symbols of these counts cost under the histograms q (each symbol's share of its
    row's total), in bits, row by row: an estimate to choose models with."""
    logs = np.log2(np.where(counts > 0, q, 1))
    return counts.sum(axis=-1) * np.log2(np.maximum(totals, 1)) - (counts * logs).sum(axis=-1)


def _entropy_bits(counts: np.ndarray) -> float:
    """The bits of symbols of these counts under their own histogram (order-0 entropy): the
    quantized histogram's cost, near enough to choose a scale's shift with."""
    c = counts[counts > 0]
    n = c.sum()
    return float(n * np.log2(n) - (c * np.log2(c)).sum()) if n else 0.0


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

    def _split(self, symbols: np.ndarray) -> np.ndarray:
        if self.kind == "n":
            return np.concatenate([symbols & 15, symbols >> 4], axis=1)
        return _SIGNED[symbols] if self.kind == "i" else symbols

    def _totals(self, q: np.ndarray) -> np.ndarray:
        """Each row's weight over all symbols, per histogram symbol counted."""
        if self.kind == "i":
            return 2 * q.sum(axis=-1) - q[..., 0] - q[..., 128]
        return q.sum(axis=-1)

    def weights(self, levels: np.ndarray) -> np.ndarray:
        """Every byte's weight under the histogram of these levels."""
        q = WEIGHTS[levels].astype(np.float64)
        if self.kind == "n":
            return np.outer(q, q).ravel()  # byte b = low nibble + 16 x high: q[b >> 4] * q[b & 15]
        return q[_SIGNED] if self.kind == "i" else q

    def choose(self, symbols: np.ndarray, classes: np.ndarray | None) -> tuple[int, np.ndarray]:
        """(classes used, their histograms): the smallest estimate of coded bits plus models,
        from one count of symbols by class."""
        split = self._split(symbols)
        if classes is None:
            by_class = np.bincount(split.ravel(), minlength=self.hist_len)[None, :]
        else:
            key = (classes[:, None] * self.hist_len + split).ravel()
            by_class = np.bincount(key, minlength=CLASSES * self.hist_len).reshape(CLASSES, self.hist_len)
        ks = (1, 2, 4, 8) if classes is not None else (1,)
        # every grouping at once: rows 0 (all), 1-2 (halves), 3-6 (quarters), 7-14 (eighths)
        groups = np.concatenate([by_class.reshape(k, len(by_class) // k, self.hist_len).sum(axis=1) for k in ks])
        levels = _levels(groups)
        q = WEIGHTS[levels]
        bits = _row_bits(groups, q, self._totals(q))
        costs = {k: float(bits[k - 1 : 2 * k - 1].sum()) + MODEL_BITS * k * self.hist_len for k in ks}
        k = min(costs, key=lambda k: (costs[k], k))
        return k, levels[k - 1 : 2 * k - 1]

    def encode(self, coder, symbols: np.ndarray, classes: np.ndarray | None, k: int, hists: np.ndarray) -> None:
        for c, q in enumerate(hists):
            part = symbols if k == 1 else symbols[classes * k // CLASSES == c]
            if part.size and self.hist_len > 1:  # a one-symbol alphabet costs nothing to code
                coder.encode(part.ravel().astype(np.int32), self.model(q))

    def decode(self, coder, rows: int, width: int, classes: np.ndarray | None, k: int, hists: list[np.ndarray]) -> np.ndarray:
        out = np.empty((rows, width), np.int64)
        for c, q in enumerate(hists):
            where = slice(None) if k == 1 else classes * k // CLASSES == c
            n = rows if k == 1 else int(np.count_nonzero(where))
            if n and self.hist_len == 1:
                out[where] = 0
            elif n:
                if not q.any():
                    raise _damaged("a stream has symbols in a class whose histogram is empty")
                out[where] = _decoded(coder, self.model(q), n * width).reshape(n, width)
        if out.size and int(out.max()) >= self.alphabet:
            raise _damaged(f"a symbol is outside its alphabet of {self.alphabet}")
        return out

    def model(self, q: np.ndarray):
        return constriction.stream.model.Categorical(self.weights(q), perfect=False)


def _damaged(what: str) -> FragmentError:
    return FragmentError(f"range-coded blocks are damaged: {what}")


def _decoded(coder, model, n: int) -> np.ndarray:
    try:
        return np.asarray(coder.decode(model, n), np.int64)
    except (AssertionError, ValueError, RuntimeError, OverflowError) as e:  # what constriction raises on words it cannot decode (AssertionError: invalid for the model)
        raise _damaged(f"its coded words do not decode: {e}") from None


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
    v = u if base is not None or not len(u) else u - u.min()

    def coarse_of(s: int) -> np.ndarray:
        return (u >> s) - (base >> s) if base is not None else v >> s

    def cost(s: int) -> float:
        c = coarse_of(s)
        coarse = np.bincount(c - c.min()) if len(c) else np.zeros(1, np.int64)
        fine = np.bincount(v & ((1 << s) - 1), minlength=1 << s)
        return _entropy_bits(coarse) + _entropy_bits(fine) + MODEL_BITS * (len(coarse) + len(fine))

    def spread(s: int) -> int:
        c = coarse_of(s)
        return int(c.max() - c.min()) if len(c) else 0

    least = next(s for s in range(MAX_SHIFT + 1) if spread(s) < 512)  # at MAX_SHIFT at the latest: u < 2^16
    valid = range(least, MAX_SHIFT + 1)
    costs = {s: cost(s) for s in valid[::2]}
    best = min(costs, key=costs.__getitem__)
    for t in (best - 1, best + 1):
        if t in valid:
            costs[t] = cost(t)
    s = min(costs, key=costs.__getitem__)
    c = coarse_of(s)
    if base is None:
        return costs[s], s, int(u.min()) if len(u) else 0, c, v & ((1 << s) - 1), 0
    low = int(c.min()) if len(c) else 0
    return costs[s], s, low, c - low, u & ((1 << s) - 1), 1


class QuantizedBlocks:
    """The codec: spec `rans:FIELDS`, FIELDS the block's fields in order (QUANTIZED_FIELDS)."""

    def __init__(self, text: str):
        self.fields = _fields(text)
        self.width = sum(w for _, w in self.fields)
        self.spec = f"rans:{text}"
        self._z = zstandard.ZstdCompressor(level=HEADER_LEVEL)

    def encode(self, data: bytes | memoryview) -> bytes:
        src = np.frombuffer(data, np.uint8)
        blocks = len(src) // self.width
        rows = src[: blocks * self.width].reshape(blocks, self.width)
        tail = src[blocks * self.width :].tobytes()
        head = [struct.pack("<IB", blocks, len(tail)), tail]
        coder = constriction.stream.queue.RangeEncoder()
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
                edges = np.quantile(first, np.arange(1, CLASSES) / CLASSES, method="lower").astype("<u2") if blocks else np.zeros(CLASSES - 1, "<u2")
                head.append(edges.tobytes())
                classes = np.searchsorted(edges, first, side="right")
        models = self._z.compress(b"".join(head))
        return struct.pack("<I", len(models)) + models + coder.get_compressed().tobytes()

    def _encode_scale(self, coder, u: np.ndarray, classes: np.ndarray | None, base: np.ndarray | None) -> bytes:
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
        words = view[4 + size :]
        if len(words) % 4:
            raise _damaged("its coded words are not whole 32-bit words")
        head = _Reader(_unpack_models(view[4 : 4 + size], limit))
        blocks, n_tail = head.take("<IB")
        if blocks * self.width + n_tail > limit:
            raise _damaged(f"decodes to {blocks * self.width + n_tail} bytes, more than the {limit} recorded")
        tail = head.bytes(n_tail).tobytes()
        coder = constriction.stream.queue.RangeDecoder(np.frombuffer(words, np.uint32).copy())
        rows = np.empty((blocks, self.width), np.uint8)
        classes = None
        at = 0
        for kind, w in self.fields:
            if kind == "s":
                mode, relative, low, s, coarse = head.take("<BBiBH")
                if mode > MIXED or relative > int(classes is not None and self.fields[0][0] == "s") or s > MAX_SHIFT or coarse >= MAX_COARSE:
                    raise _damaged(f"a scale's sign mode {mode}, relative flag {relative}, shift {s} or coarse alphabet {coarse + 1} is out of bounds")
                hi = _decode_stream(head, coder, _Stream(coarse + 1), blocks, 1, classes)[:, 0]
                fine = _decode_stream(head, coder, _Stream(1 << s), blocks, 1, classes)[:, 0]
                values = ((hi + low + (first >> s)) << s) | fine if relative else low + ((hi << s) | fine)
                if blocks and not 0 <= int(values.min()) <= int(values.max()) <= (0xFFFF if mode == MIXED else 0x7FFF):
                    raise _damaged("a scale is out of its 16 bits")
                rows[:, at : at + 2] = _unorder(mode, values).view(np.uint8).reshape(blocks, 2)
            elif kind == "q":
                rows[:, at : at + w] = _five_bit_fields(_decode_stream(head, coder, _Stream(32), blocks, 32, classes))
            else:
                cols = _decode_stream(head, coder, _Stream(256, kind), blocks, w, classes)
                rows[:, at : at + w] = cols
                values = cols[:, 0]
            at += w
            if classes is None:
                first = values
                edges = np.frombuffer(head.bytes(2 * (CLASSES - 1)).tobytes(), "<u2")
                classes = np.searchsorted(edges, first, side="right")
        if head.pos != len(head.data):
            raise _damaged("its models have bytes left over")
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
    return bytes([k]) + np.diff(q, axis=1, prepend=np.uint8(0)).tobytes()


def _decode_stream(head: _Reader, coder, stream: _Stream, rows: int, width: int, classes: np.ndarray | None) -> np.ndarray:
    (k,) = head.take("<B")
    if k not in ((1, 2, 4, 8) if classes is not None else (1,)):
        raise _damaged(f"a stream names {k} classes")
    hists = [np.cumsum(head.bytes(stream.hist_len), dtype=np.uint8).astype(np.int64) for _ in range(k)]
    if any(int(h.max()) >= len(WEIGHTS) for h in hists):
        raise _damaged(f"a histogram level is beyond the {len(WEIGHTS)} levels")
    return stream.decode(coder, rows, width, classes, k, hists)


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
