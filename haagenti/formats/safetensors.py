"""The safetensors container: a strict, streaming reader and its record (the header verbatim).

We parse the header ourselves instead of calling `safetensors.safe_open` because we must
(a) keep the header bytes verbatim so a restored file has the same sha256,
(b) read tensor bytes in fragment-sized pieces through fsspec without loading the file,
(c) reject lying headers with a precise message before anything is written.
The `safetensors` package is still used by the examples and tests to write files.
"""
from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO, Sequence

from haagenti.errors import DamagedError, FormatError
from haagenti.formats.container import ContainerFormat, FileEntry, ModelFiles, SourceFile, SourceTensor, StoredFile, StoredTensor
from haagenti.formats.dtypes import DType, dtype
from haagenti.formats.splice import Splice

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    header_bytes: bytes  # the JSON exactly as stored (padding included)
    data_start: int  # absolute offset of the data section
    tensors: list[TensorEntry]  # in data order
    metadata: dict[str, str]


def parse_header(f: BinaryIO, file_size: int, where: str) -> SafetensorsHeader:
    """Read and validate a safetensors header; `where` names the file in errors."""
    if file_size < 8:
        raise FormatError(f"{where}: truncated safetensors file ({file_size} bytes, need at least 8)")
    head = f.read(9)
    (n,) = struct.unpack("<Q", head[:8])
    if head[8:] != b"{":  # the header is a JSON object: anything else (a text file, say) is not safetensors
        raise FormatError(f"{where}: not a safetensors file (no JSON header after its 8-byte length)")
    if n < 2:
        raise FormatError(f"{where}: header length {n} is too short for a JSON object")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise FormatError(f"{where}: header length {n} runs past the end of the file ({file_size} bytes)")
    raw = b"{" + f.read(n - 1)
    if len(raw) != n:
        raise FormatError(f"{where}: truncated header")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header must be a JSON object")
    metadata = doc.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    data_size = file_size - 8 - n
    tensors = [_entry(name, info, data_size, where) for name, info in doc.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    cursor = 0
    for t in tensors:
        if t.begin < cursor:
            raise FormatError(f"{where}: tensor {t.name!r} overlaps the previous tensor")
        if t.begin > cursor:
            raise FormatError(f"{where}: {t.begin - cursor} unaccounted bytes before tensor {t.name!r}")
        cursor = t.end
    if cursor != data_size:
        raise FormatError(f"{where}: data section has {data_size - cursor} bytes not described by the header")
    return SafetensorsHeader(raw, 8 + n, tensors, dict(metadata))


def _entry(name: str, info: object, data_size: int, where: str) -> TensorEntry:
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry {name!r} is not an object")
    dt = info.get("dtype")
    if not isinstance(dt, str):
        raise FormatError(f"{where}: tensor {name!r} has no dtype")
    try:
        d = dtype(dt)
    except FormatError as e:
        raise FormatError(f"{where}: tensor {name!r}: {e}") from None
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape):
        raise FormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if math.prod(shape) * d.itemsize >= 2**63:  # more bytes than any file (or an int64 offset) can hold
        raise FormatError(f"{where}: tensor {name!r} of shape {shape} has more bytes than a file can hold")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise FormatError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise FormatError(f"{where}: tensor {name!r} offsets [{begin}, {end}] lie outside the data section ({data_size} bytes)")
    expected = math.prod(shape) * d.itemsize
    if end - begin != expected:
        raise FormatError(f"{where}: tensor {name!r} spans {end - begin} bytes but shape {shape} of {dt} needs {expected}")
    return TensorEntry(name, d, tuple(shape), begin, end)


def file_prefix(header_bytes: bytes) -> bytes:
    """What precedes the tensor data in a file: the 8-byte length and the header verbatim."""
    return struct.pack("<Q", len(header_bytes)) + header_bytes


class Safetensors(ContainerFormat):
    """Its record keeps the header JSON; the file is the length, the header, then the tensors
    back to back (one gap, before the first)."""

    name = "safetensors"
    description = "a safetensors file"
    extensions = (".safetensors",)
    exclusive = True

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        with entry.open() as fh:
            h = parse_header(fh, entry.size, entry.url)
        tensors = [SourceTensor(t.name, t.dtype, t.shape, entry.index, t.nbytes, data_begin=h.data_start + t.begin) for t in h.tensors]
        return SourceFile(entry.name, entry.url, self.name, entry.size, h.header_bytes), tensors

    def splice(self, header: bytes, where: str) -> Splice:
        return Splice([file_prefix(header)])

    def check_record(self, record: StoredFile, tensors: Sequence[StoredTensor], where: str) -> None:
        """The header decides where each tensor's bytes go: it must describe the recorded tensors."""
        try:
            h = parse_header(io.BytesIO(file_prefix(record.header)), record.size, f"{where}, file {record.name!r}")
        except FormatError as e:
            raise DamagedError(f"recorded header: {e}") from None
        described = {e.name: (e.dtype.name, e.shape) for e in h.tensors}
        if described != {t.name: (dtype(t.dtype).name, tuple(t.shape)) for t in tensors}:
            raise DamagedError(f"{where}, file {record.name!r}: its recorded header and tensor records disagree")
