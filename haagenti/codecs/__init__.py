"""Composable byte codecs, after zarr's: each has `encode`, `decode` and a `spec` string, and a
chain is written as their specs joined by '+', e.g. "rotl:2:3+bytegroup:2+zstd:3"."""
from haagenti.codecs.core import CODECS, DENSE, PLANES, ByteGroup, Codec, CodecChain, RotateLeft, Zstd, chain_choices, chain_for, codec_chain, encode_smallest
from haagenti.codecs.delta import apply_delta, cast_reference, smallest_encoding

__all__ = [
    "CODECS",
    "DENSE",
    "PLANES",
    "RotateLeft",
    "ByteGroup",
    "Codec",
    "CodecChain",
    "Zstd",
    "chain_choices",
    "chain_for",
    "codec_chain",
    "encode_smallest",
    "apply_delta",
    "cast_reference",
    "smallest_encoding",
]
