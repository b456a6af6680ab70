"""A model file as verbatim gaps around its tensors' data: gap0 t0 gap1 t1 ... t(n-1) gap(n).

Every format haagenti cuts is one of these (haagenti.formats.container walks the layout). A
safetensors file is its length and header then tensors back to back (one gap, before the first
tensor); a GGUF file has its header, metadata and tensor infos before the first tensor and
alignment padding after each; an ONNX file is a protobuf whose initializers' `raw_data` fields
sit between the rest of the message. The tensors become fragments; the gaps are stored verbatim in the file's record (files.header), so a restore
writes the original bytes and the file's tree (hashing.file_tree) covers them.

A tensor can be stored transposed: ONNX exporters fold a Linear weight's transpose into the
initializer (the file holds W^T, (in, out)); storing it as W makes its fragments those of the
same weight in a safetensors or GGUF file. The record keeps which tensors are transposed.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from haagenti.errors import FormatError
from haagenti.formats.dtypes import DType

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Splice:
    gaps: list[bytes]  # gaps[k] precedes the file's k-th tensor; one more may follow the last
    # k -> (rows, cols, itemsize): the file holds a (rows, cols) matrix, stored as its transpose
    transposed: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def pack(self) -> bytes:
        """What files.header holds for a spliced file: u64le len(json) || json || the gaps."""
        doc = json.dumps({"gaps": [len(g) for g in self.gaps], "transposed": [[k, *v] for k, v in sorted(self.transposed.items())]}).encode()
        return struct.pack("<Q", len(doc)) + doc + b"".join(self.gaps)

    @classmethod
    def unpack(cls, blob: bytes, where: str) -> "Splice":
        try:
            (n,) = struct.unpack_from("<Q", blob)
            doc = json.loads(blob[8 : 8 + n])
            sizes, pos, gaps = doc["gaps"], 8 + n, []
            for s in sizes:
                gaps.append(bytes(blob[pos : pos + s]))
                pos += s
            transposed = {int(k): (int(r), int(c), int(i)) for k, r, c, i in doc["transposed"]}
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{where}: damaged file record ({e})") from None
        if pos != len(blob) or any(i not in _UINT for _, _, i in transposed.values()):
            raise FormatError(f"{where}: damaged file record (gap lengths do not add up)")
        return cls(gaps, transposed)


# Where a file holds a tensor transposed: (the tensor's offset in the file, rows, cols, itemsize)
# of the (rows, cols) matrix the file holds, the tensor's transpose.
Turn = tuple[int, int, int, int]


def transpose(data: bytes, rows: int, cols: int, itemsize: int) -> bytes:
    """The (cols, rows) transpose of a row-major (rows, cols) matrix of `itemsize`-byte items."""
    return np.frombuffer(data, _UINT[itemsize]).reshape(rows, cols).T.tobytes()


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's data lies in its file, as a format reader found it."""

    name: str
    dtype: DType
    shape: tuple[int, ...]  # numpy order (a GGUF file lists dims the other way round)
    begin: int  # absolute offset in the file
    nbytes: int
    transposed: bool = False  # the file holds the (shape[1], shape[0]) transpose of this tensor


def splice_spans(spans: list[TensorSpan], file_size: int, read: Callable[[int, int], bytes], where: str) -> Splice:
    """The Splice of a file whose tensors lie at `spans` (in file order, checked not to overlap):
    the bytes between them, read with `read(begin, end)`."""
    gaps, transposed, cursor = [], {}, 0
    for k, s in enumerate(spans):
        if s.begin < cursor:
            raise FormatError(f"{where}: tensor {s.name!r} overlaps the previous tensor")
        if s.begin + s.nbytes > file_size:
            raise FormatError(f"{where}: tensor {s.name!r} runs past the end of the file ({file_size} bytes)")
        gaps.append(read(cursor, s.begin))
        if s.transposed:
            transposed[k] = (s.shape[1], s.shape[0], s.dtype.itemsize)
        cursor = s.begin + s.nbytes
    gaps.append(read(cursor, file_size))
    return Splice(gaps, transposed)
