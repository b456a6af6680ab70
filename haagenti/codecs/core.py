"""Byte grouping and zstd, the two codecs every stored fragment goes through."""
from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from typing import Callable, Protocol

import numpy as np
import zstandard

from haagenti.codecs.rans import QUANTIZED_FIELDS, QuantizedBlocks
from haagenti.errors import FragmentError
from haagenti.formats.dtypes import dtype


class Codec(Protocol):
    spec: str

    """Encoders and decoders take and return any bytes-like object (bytes or a memoryview).
    `decode` refuses to produce more than `limit` bytes: stored bytes are untrusted, and a zstd
    frame header may claim any size (it would be allocated before a byte is checked)."""

    def encode(self, data: bytes | memoryview) -> bytes | memoryview: ...

    def decode(self, data: bytes | memoryview, limit: int) -> bytes | memoryview: ...


def _within(size: int, limit: int) -> None:
    if size > limit:
        raise FragmentError(f"decodes to {size} bytes, more than the {limit} recorded")


class ByteGroup:
    """Split each `width`-byte word into `width` byte planes (ZipNN-style): exponent bytes of
    floats are low-entropy and compress well once they are no longer interleaved with mantissas."""

    def __init__(self, width: int):
        if width not in (2, 4, 8):
            raise ValueError(f"byte group width must be 2, 4 or 8, not {width}")
        self.width = width
        self.spec = f"bytegroup:{width}"
        self._planes = np.empty(0, np.uint8)  # reused: chains are per thread (codec_chain)

    # Shifts on whole words, written in place, instead of a strided transpose or temporaries:
    # measured per 256 KiB BF16 fragment, encode 107 -> 29 us and decode 293 -> 40 us (fresh
    # temporaries of this size are fresh pages). encode returns a view of a buffer this codec
    # reuses on its next call (the next codec of the chain consumes it first); decode returns
    # a buffer of its own, which the caller keeps.
    def encode(self, data: bytes | memoryview) -> memoryview:
        if len(data) % self.width:
            raise ValueError(f"{len(data)} bytes do not split into {self.width}-byte words")
        words = np.frombuffer(data, dtype=_WORD[self.width])
        if len(self._planes) < len(data):
            self._planes = np.empty(len(data), np.uint8)
        planes = self._planes[: len(data)].reshape(self.width, len(words))
        np.copyto(planes[0], words, casting="unsafe")  # the low byte: a plain cast, 3.5x faster than a shift by 0
        for i in range(1, self.width):
            np.right_shift(words, 8 * i, out=planes[i], casting="unsafe")  # keeps byte i of each word
        return memoryview(planes).cast("B")

    def decode(self, data: bytes | memoryview, limit: int) -> memoryview:
        return memoryview(self.join(np.frombuffer(data, dtype=np.uint8).reshape(self.width, -1), limit)).cast("B")

    def join(self, planes: Sequence[np.ndarray], limit: int) -> np.ndarray:
        """Words (a fresh array) from their `width` byte planes, lowest first; the planes may
        be separate buffers (Zstd.streams: zstd's output as it comes, never concatenated)."""
        if len(planes) != self.width or any(len(p) != len(planes[0]) for p in planes):
            raise FragmentError(f"{len(planes)} byte planes of {[len(p) for p in planes][:8]} bytes do not make {self.width}-byte words")
        _within(self.width * len(planes[0]), limit)
        out = planes[-1].astype(_WORD[self.width])
        for i in range(self.width - 2, -1, -1):
            out <<= 8
            out |= planes[i]
        return out


class RotateLeft:
    """Rotate each `width`-byte word left by `bits` bits. Composed before ByteGroup, this
    chooses which bits share the top byte plane: by one bit, a float's sign moves to the lowest
    bit and its exponent fills the top byte (sign-last, as ZipNN groups it); by three (bf16,
    fp32), the two top exponent bits, near-constant in trained weights, move to the lowest plane,
    where zstd's Huffman stage takes them at 1 bit in 8, and the two top mantissa bits, whose
    skew depends on the exponent, join the exponent plane. Measured in docs/decisions/0006-plain-coding.md."""

    def __init__(self, width: int, bits: int):
        if width not in (2, 4, 8) or not 0 < bits < 8 * width:
            raise ValueError(f"rotl needs a width of 2, 4 or 8 bytes and 1 to 8 x width - 1 bits, not {width}:{bits}")
        self.width, self.bits = width, bits
        self.spec = f"rotl:{width}:{bits}"
        self._out = np.empty(0, _WORD[width])
        self._tmp = np.empty(0, _WORD[width])

    def _rotate(self, data: bytes | memoryview, left: int, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
        words = np.frombuffer(data, dtype=_WORD[self.width])
        out, tmp = out[: len(words)], tmp[: len(words)]
        np.left_shift(words, left, out=out)
        np.right_shift(words, 8 * self.width - left, out=tmp)
        out |= tmp
        return out

    def encode(self, data: bytes | memoryview) -> memoryview:
        """A view of a buffer reused on the next call (the next codec consumes it first)."""
        if len(data) % self.width:
            raise ValueError(f"{len(data)} bytes do not split into {self.width}-byte words")
        n = len(data) // self.width
        if len(self._out) < n:
            self._out, self._tmp = np.empty(n, _WORD[self.width]), np.empty(n, _WORD[self.width])
        return memoryview(self._rotate(data, self.bits, self._out, self._tmp)).cast("B")

    def decode(self, data: bytes | memoryview, limit: int) -> memoryview:
        _within(len(data), limit)
        return memoryview(self.undo(np.frombuffer(data, dtype=_WORD[self.width]).copy())).cast("B")

    def undo(self, words: np.ndarray) -> np.ndarray:
        """`words` rotated back in place (a writable array of this width's words): a chain
        whose previous codec made the words gives them here without a fresh buffer."""
        n = len(words)
        if len(self._tmp) < n:
            self._tmp = np.empty(n, _WORD[self.width])
        tmp = self._tmp[:n]
        np.right_shift(words, self.bits, out=tmp)
        words <<= 8 * self.width - self.bits
        words |= tmp
        return words


class BlockFields:
    """Split quantized blocks into planes: each plane a run of `widths[i]` bytes at the same
    offset of every block (a scale's byte, a block's codes), so scales stop interleaving with
    codes and each plane gets an entropy coder of its own (Zstd with the same widths as
    weights). Bytes after the last whole block follow the planes unchanged. Measured in
    docs/decisions/0280-quantized-blocks.md."""

    def __init__(self, widths: tuple[int, ...]):
        self.widths = widths
        self.width = sum(widths)
        self.spec = "blocks:" + ".".join(map(str, widths))

    def _planes(self, n: int) -> list[tuple[int, int, int]]:
        """(offset in a block, width, offset in the planes) of each plane of n bytes."""
        blocks, at, out = n // self.width, 0, []
        for w in self.widths:
            out.append((at, w, at * blocks))
            at += w
        return out

    def encode(self, data: bytes | memoryview) -> memoryview:
        src = np.frombuffer(data, np.uint8)
        blocks = len(src) // self.width
        whole = src[: blocks * self.width].reshape(blocks, self.width)
        out = np.empty(len(src), np.uint8)
        for at, w, pos in self._planes(len(src)):
            out[pos : pos + blocks * w].reshape(blocks, w)[...] = whole[:, at : at + w]
        out[blocks * self.width :] = src[blocks * self.width :]
        return memoryview(out)

    def decode(self, data: bytes | memoryview, limit: int) -> memoryview:
        _within(len(data), limit)
        src = np.frombuffer(data, np.uint8)
        blocks = len(src) // self.width
        out = np.empty(len(src), np.uint8)
        whole = out[: blocks * self.width].reshape(blocks, self.width)
        for at, w, pos in self._planes(len(src)):
            whole[:, at : at + w] = src[pos : pos + blocks * w].reshape(blocks, w)
        out[blocks * self.width :] = src[blocks * self.width :]
        return memoryview(out)


def _widths(text: str) -> tuple[int, ...]:
    """"1.1.16" -> (1, 1, 16): plane widths of a spec, each 1 to 1024 bytes, at most 64 planes
    (bounds on what a stored spec may ask of the decoder)."""
    widths = tuple(int(w) for w in text.split("."))
    if not 0 < len(widths) <= 64 or not all(0 < w <= 1024 for w in widths):
        raise ValueError(text)
    return widths


_WORD = {2: np.dtype("<u2").type, 4: np.dtype("<u4").type, 8: np.dtype("<u8").type}  # safetensors data is little-endian


# The "planes" preset: a byte plane of floats (exponents, XOR residuals) is entropy, not
# repetition, so match finding is cut to the bone (tiny hash table, 7-byte matches only) and
# zstd spends its time in the Huffman literal coder. Measured on the example family's exponent
# planes: 2.6x faster than level 1 and 12% smaller (docs/decisions/0006-plain-coding.md).
PLANES = "planes"
# The planes preset, and quantized blocks range-coded as well (kept where smaller): 1-1.6 points
# more saved on lone GGUF files for ~2-3x the ingest and restore time of the planes
# (docs/decisions/0350-quantized-range-coder.md, 0380-table-rans.md), so a library asks for it.
DENSE = "dense"
_PLANE_PARAMS = zstandard.ZstdCompressionParameters(window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0, strategy=1)


class Zstd:
    """zstd over `streams` equal parts compressed independently; a part that zstd does not
    shrink is stored raw. Every part is tried whole: with the planes preset zstd passes over an
    incompressible plane at ~4 GB/s, so a 16 KiB probe to skip it (tried, then dropped) cost
    more on the planes that do compress than it saved (docs/decisions/0006-plain-coding.md). `level` is a zstd
    level or PLANES; decoding never depends on it. With `weights` (the planes of BlockFields),
    the parts are in those proportions instead, the last taking what does not divide; decoding
    needs only their count, since each part records its own length."""

    def __init__(self, level: int | str = 3, streams: int = 1, weights: tuple[int, ...] = ()):
        self.level = level
        self.streams = len(weights) or streams
        self.weights = weights
        tail = ".".join(map(str, weights)) if weights else str(streams)
        self.spec = f"zstd:{level}" if tail == "1" else f"zstd:{level}:{tail}"
        self._c = zstandard.ZstdCompressor(compression_params=_PLANE_PARAMS) if level == PLANES else zstandard.ZstdCompressor(level=int(level))
        self._d = zstandard.ZstdDecompressor()

    def encode(self, data: bytes) -> bytes:
        n = len(data)
        if not self.weights and n % self.streams:
            raise ValueError(f"{n} bytes do not split into {self.streams} streams")
        unit = n // sum(self.weights or (self.streams,))
        ends = np.cumsum([w * unit for w in self.weights or (1,) * self.streams]).tolist()
        ends[-1] = n
        head, body = [], []
        for begin, end in zip([0] + ends[:-1], ends):
            part = data[begin:end]
            packed = self._pack(part)
            head.append(struct.pack("<BI", packed is not None, len(packed if packed is not None else part)))
            body.append(packed if packed is not None else part)
        return b"".join(head + body)  # one copy of the output, not two

    def _pack(self, part: bytes) -> bytes | None:
        packed = self._c.compress(part)
        return packed if len(packed) < len(part) else None

    def decode(self, data: bytes | memoryview, limit: int) -> memoryview:
        """The streams copied into one buffer of their own by numpy (which releases the GIL),
        not joined by bytes.join (which holds it for the copy of every byte and so kept restore
        threads from running side by side)."""
        parts = self.streams_of(data, limit)
        return memoryview(np.concatenate(parts) if len(parts) > 1 else parts[0].copy())

    def streams_of(self, data: bytes | memoryview, limit: int) -> list[np.ndarray]:
        """Each stream's bytes, uncopied: zstd's output, or a view of `data` for a stream stored raw."""
        view = memoryview(data)  # slices without copies
        pos = 5 * self.streams
        parts = []
        for i in range(self.streams):
            compressed, length = struct.unpack_from("<BI", view, 5 * i)
            part = view[pos : pos + length]
            pos += length
            if compressed:  # a frame without a content size is refused by decompress itself
                _within(zstandard.frame_content_size(part), limit)
            parts.append(np.frombuffer(self._d.decompress(part) if compressed else part, np.uint8))
        return parts


class CodecChain:
    """Codecs applied left to right on encode and right to left on decode."""

    def __init__(self, codecs: list[Codec]):
        self.codecs = codecs
        self.spec = "+".join(c.spec for c in codecs) or "raw"

    def encode(self, data: bytes) -> bytes:
        for c in self.codecs:
            data = c.encode(data)
        return data if isinstance(data, bytes) else bytes(data)  # never a codec's reused buffer

    def decode(self, data: bytes | memoryview, limit: int) -> bytes | memoryview:
        """Byte planes coded as one zstd stream each (a float chain's tail) are joined into
        words straight from zstd's output and rotated back in place: the copy that
        concatenated the streams and the fresh buffer the rotation wrote only moved bytes
        (docs/decisions/0320-decode-in-place.md)."""
        codecs = self.codecs
        if len(codecs) >= 2 and isinstance(codecs[-1], Zstd) and isinstance(codecs[-2], ByteGroup) \
                and not codecs[-1].weights and codecs[-1].streams == codecs[-2].width:
            words = codecs[-2].join(codecs[-1].streams_of(data, limit), limit)
            codecs = codecs[:-2]
            if codecs and isinstance(codecs[-1], RotateLeft) and codecs[-1].width == words.itemsize:
                words = codecs[-1].undo(words)
                codecs = codecs[:-1]
            data = memoryview(words).cast("B")
        for c in reversed(codecs):
            data = c.decode(data, limit)
        # "raw": a copy, never a view of the caller's buffer (a cached view would pin it).
        return data if self.codecs else bytes(data)


_local = threading.local()


def codec_chain(spec: str) -> CodecChain:
    """The chain for a spec such as "bytegroup:2+zstd:3:2" (or "raw"). Chains are cached per
    thread: building zstd contexts costs more than compressing a fragment, and a zstd context
    must not be shared between threads."""
    cache = _local.__dict__.setdefault("chains", {})
    chain = cache.get(spec)
    if chain is None:
        chain = cache[spec] = _parse_chain(spec)
    return chain


def _zstd(args: list[str]) -> Zstd:
    if len(args) not in (1, 2) or not (args[0] == PLANES or args[0].lstrip("-").isdigit()):
        raise ValueError(args)
    level = args[0] if args[0] == PLANES else int(args[0])
    if len(args) == 2 and "." in args[1]:
        return Zstd(level, weights=_widths(args[1]))
    return Zstd(level, int(args[1]) if len(args) == 2 else 1)


# Codecs by spec name: a codec is registered here once and then composes with any other.
CODECS: dict[str, Callable[[list[str]], Codec]] = {
    "blocks": lambda args: BlockFields(*map(_widths, args)),
    "bytegroup": lambda args: ByteGroup(*map(int, args)),
    "rans": lambda args: QuantizedBlocks("rans", *args),
    "rans2": lambda args: QuantizedBlocks("rans2", *args),
    "rotl": lambda args: RotateLeft(*map(int, args)),
    # format 4's first spelling of rotl:W:1 (rows written before the rotation became per dtype)
    "signlast": lambda args: RotateLeft(*map(int, args), 1),
    "zstd": _zstd,
}


def _parse_chain(spec: str) -> CodecChain:
    if spec == "raw":
        return CodecChain([])
    codecs: list[Codec] = []
    for part in spec.split("+"):
        name, *args = part.split(":")
        try:
            codecs.append(CODECS[name](args))
        except (KeyError, TypeError, ValueError):
            raise FragmentError(f"unknown codec spec {part!r} in {spec!r}") from None
    return CodecChain(codecs)


# Bits a float word is rotated left before byte grouping (RotateLeft); 1 (sign last) for the
# others. Reduction of plain fragments by rotation, measured in docs/decisions/0006-plain-coding.md: bf16 and
# fp32 gain most at 3, fp16 (5 exponent bits, all needed in the top plane) at 1.
ROTATION = {"BF16": 3, "F32": 3}


# The fields of GGUF's quantized blocks, in block order (ggml-common.h): "s2" a 2-byte scale or
# min, split into byte planes; "c16" 16 bytes of codes (or packed sub-scales, high bits), kept
# as one plane. Planes, nibble splits and what each gains: docs/decisions/0280-quantized-blocks.md.
BLOCK_FIELDS = {
    "Q4_0": "s2 c16",
    "Q4_1": "s2 s2 c16",
    "Q5_0": "s2 c4 c16",
    "Q5_1": "s2 s2 c4 c16",
    "Q8_0": "s2 c32",
    "Q8_1": "s4 s4 c32",
    "Q2_K": "c16 c64 s2 s2",
    "Q3_K": "c32 c64 c12 s2",
    "Q4_K": "s2 s2 c12 c128",
    "Q5_K": "s2 s2 c12 c32 c128",
    "Q6_K": "c128 c64 c16 s2",
    "Q8_K": "s4 c256 c32",
    "TQ1_0": "c48 c4 s2",
    "TQ2_0": "c64 s2",
    "MXFP4": "s1 c16",
}


def block_planes(dtype_name: str) -> tuple[int, ...]:
    """Plane widths of a quantized type's blocks: a byte each for a scale, one for each run of codes."""
    widths: list[int] = []
    for field in BLOCK_FIELDS[dtype_name].split():
        n = int(field[1:])
        widths += [1] * n if field[0] == "s" else [n]
    return tuple(widths)


def chain_for(dtype_name: str, level: int | str = PLANES) -> CodecChain:
    """The chain used for a fragment of this dtype: rotated byte planes for multi-byte floats
    (and the residuals of deltas, which share their structure), the planes of its blocks for a
    quantized type, plain zstd otherwise (level 1 for the planes preset: integer data has real
    repeats worth matching)."""
    level = PLANES if level == DENSE else level
    d = dtype(dtype_name)
    if d.is_float and d.itemsize in (2, 4, 8):
        w = d.itemsize
        return codec_chain(f"rotl:{w}:{ROTATION.get(d.name, 1)}+bytegroup:{w}+zstd:{level}:{w}")
    if d.name in BLOCK_FIELDS:
        widths = ".".join(map(str, block_planes(d.name)))
        return codec_chain(f"blocks:{widths}+zstd:{level}:{widths}")
    return codec_chain(f"zstd:{1 if level == PLANES else level}")


def chain_choices(dtype_name: str, level: int | str = PLANES) -> list[CodecChain]:
    """chain_for's chain, then the alternative worth trying on short fragments and residuals:
    for floats, byte planes without a rotation. Values that straddle a power of two (norm
    weights around 1.0: 0x3F7F / 0x3F80) keep a constant top byte only unrotated, and on a few
    hundred bytes that beats the exponent plane's Huffman table (measured in docs/decisions/0006-plain-coding.md).
    For quantized blocks under the DENSE preset, the range coder."""
    dense, level = level == DENSE, PLANES if level == DENSE else level
    chain = chain_for(dtype_name, level)
    d = dtype(dtype_name)
    if d.is_float and d.itemsize in (2, 4, 8):
        return [chain, codec_chain(f"bytegroup:{d.itemsize}+zstd:{level}:{d.itemsize}")]
    if d.name in QUANTIZED_FIELDS and dense:
        return [chain, codec_chain(f"rans2:{QUANTIZED_FIELDS[d.name]}")]
    return [chain]


def encode_smallest(data: bytes, chain: CodecChain) -> tuple[str, bytes]:
    """Encode with `chain`, or keep the bytes raw when that is not smaller."""
    packed = chain.encode(data)
    if len(packed) >= len(data):
        return "raw", data if isinstance(data, bytes) else bytes(data)  # never a reused buffer
    return chain.spec, packed
