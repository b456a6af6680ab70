"""Fragments: content-addressed pieces of tensors, and the metadata kept about them."""
from __future__ import annotations

import re
from enum import Enum
from functools import lru_cache

import numpy as np

from haagenti.hashing import content_hash


class FragmentId(str):
    """Hex BLAKE3 of a fragment's raw bytes (haagenti.hashing says why BLAKE3)."""

    @classmethod
    def of(cls, data: bytes | memoryview) -> "FragmentId":
        return cls(content_hash(data))


class FragmentType(str, Enum):
    """What a fragment holds, inferred from its tensor's name; drives stats and signatures."""

    ATTENTION_Q = "attention_q"
    ATTENTION_K = "attention_k"
    ATTENTION_V = "attention_v"
    ATTENTION_O = "attention_o"
    ATTENTION_QKV = "attention_qkv"
    FEED_FORWARD = "feed_forward"
    NORM = "norm"
    EMBEDDING = "embedding"
    CONV = "conv"
    GENERIC = "generic"
    VERBATIM = "verbatim"  # a piece of what a file keeps verbatim (headers, metadata, graphs, side files): no tensor

    @classmethod
    def infer(cls, tensor_name: str) -> "FragmentType":
        return _infer(tensor_name)


_TYPE_PATTERNS = [
    (r"(norm|ln_\d|\bln\b|layernorm|rmsnorm)", FragmentType.NORM),
    (r"(embed|wte|wpe|tok_emb|pos_emb)", FragmentType.EMBEDDING),
    (r"(in_proj|qkv|c_attn)", FragmentType.ATTENTION_QKV),
    (r"(q_proj|\.query\b|to_q\b|\.wq\b)", FragmentType.ATTENTION_Q),
    (r"(k_proj|\.key\b|to_k\b|\.wk\b)", FragmentType.ATTENTION_K),
    (r"(v_proj|\.value\b|to_v\b|\.wv\b)", FragmentType.ATTENTION_V),
    (r"(o_proj|out_proj|to_out|\.wo\b|attn\.c_proj)", FragmentType.ATTENTION_O),
    (r"(mlp|ffn|feed_forward|fc\d|linear\d|up_proj|down_proj|gate_proj|\.ff\.)", FragmentType.FEED_FORWARD),
    (r"(conv)", FragmentType.CONV),
]


@lru_cache(maxsize=4096)  # a catalog repeats the same tensor names model after model
def _infer(tensor_name: str) -> FragmentType:
    n = tensor_name.lower()
    for pattern, kind in _TYPE_PATTERNS:
        if re.search(pattern, n):
            return kind
    return FragmentType.GENERIC


class Encoding(str, Enum):
    """How a stored fragment's blob turns back into its raw bytes."""

    PLAIN = "plain"  # codec chain over the raw bytes
    DELTA_XOR = "delta_xor"  # codec chain over raw XOR reference (reference cast to this dtype)
    DELTA_SUB = "delta_sub"  # codec chain over raw - reference, as wrapping unsigned words
    PREDICTED = "predicted"  # codec chain over quantized blocks less what their float reference quantizes to (haagenti.codecs.predict)


# Verbatim pieces: content-defined, so that an edit moves only the cuts near it. A cut follows
# byte i where a buzhash of bytes (i-31..i) has its low 16 bits zero (64 KiB apart on average),
# pieces 16-256 KiB (at most 256 KiB: each decodes within a fragment's bounds). The gear table
# is fixed: pieces, and so their ids, depend on it (sharing does, decoding does not).
PIECE_MIN, PIECE_MAX, _PIECE_MASK, _WINDOW = 16 * 1024, 256 * 1024, (1 << 16) - 1, 32
_GEAR = np.random.default_rng(0x76657262).integers(0, 1 << 32, 256, dtype=np.uint32)


def verbatim_pieces(data: bytes) -> list[bytes]:
    """`data` (what a file keeps verbatim) cut into the pieces it is stored as: two GGUF headers
    that differ in one metadata value share every piece but the one or two around it."""
    n = len(data)
    if n <= PIECE_MIN:
        return [bytes(data)] if n else []
    t = _GEAR[np.frombuffer(data, np.uint8)]
    h = t.copy()
    for j in range(1, _WINDOW):  # h[i] = XOR over j of rotl(t[i - j], j)
        h[j:] ^= (t[: n - j] << np.uint32(j)) | (t[: n - j] >> np.uint32(32 - j))
    ends, last = [], 0
    for c in (np.flatnonzero((h & _PIECE_MASK) == 0) + 1).tolist():
        while c - last > PIECE_MAX:
            last += PIECE_MAX
            ends.append(last)
        if c - last >= PIECE_MIN and c < n:
            ends.append(c)
            last = c
    while n - last > PIECE_MAX:
        last += PIECE_MAX
        ends.append(last)
    bounds = [0, *ends, n]
    return [bytes(data[a:b]) for a, b in zip(bounds, bounds[1:])]
