"""Fragments: content-addressed pieces of tensors, and the metadata kept about them."""
from __future__ import annotations

import re
from enum import Enum
from functools import lru_cache

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
