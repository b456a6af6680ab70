"""The GGUF container. A strict, streaming reader: where each tensor's data lies, nothing loaded but the header.

The `gguf` package supplies the tables (value types, quantized block sizes); its GGUFReader is
not used to parse because it memory-maps a whole local file, and a model may be on S3: we read
the header through fsspec, bounded, and refuse lying files with one precise line before
anything is written. Tests check our offsets against GGUFReader's.
"""
from __future__ import annotations

import math
import struct
from typing import BinaryIO

from haagenti.errors import FormatError
from haagenti.formats.dtypes import BY_NAME, DType, quantized
from haagenti.formats.container import FileEntry, ModelFiles, SourceFile, SourceTensor, SplicedFormat
from haagenti.formats.splice import Splice, TensorSpan, splice_spans

MAX_HEADER_BYTES = 256 * 1024 * 1024  # metadata and tensor infos (an LLM vocabulary takes a few MB)
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_READ = 1 << 20


class _Header:
    """A bounded window on the start of the file, grown as the parser asks for bytes."""

    def __init__(self, fh: BinaryIO, size: int, where: str):
        self.fh, self.size, self.where = fh, size, where
        self.buf = bytearray()
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > self.size:
            raise FormatError(f"{self.where}: truncated GGUF header (needs byte {end}, file has {self.size})")
        if end > MAX_HEADER_BYTES:
            raise FormatError(f"{self.where}: GGUF metadata exceeds the {MAX_HEADER_BYTES}-byte limit")
        if end > len(self.buf):
            want = min(max(end - len(self.buf), _READ, len(self.buf)), self.size - len(self.buf), MAX_HEADER_BYTES - len(self.buf))
            self.buf += self.fh.read(want)
            if end > len(self.buf):
                raise FormatError(f"{self.where}: file shrank while reading its GGUF header")
        out = memoryview(self.buf)[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > self.size - self.pos:
            raise FormatError(f"{self.where}: a GGUF string of {n} bytes runs past the end of the file")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.where}: a GGUF string is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 8:
            itype, count = self.unpack("I"), self.unpack("Q")
            item = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8  # a string takes 8 bytes at least
            if count * item > self.size - self.pos:
                raise FormatError(f"{self.where}: a GGUF array of {count} items runs past the end of the file")
            if itype in _SCALARS:  # skipped in one step: only general.alignment is read
                self.take(count * item)
            else:
                for _ in range(count):
                    self.value(itype, depth + 1)
            return None
        raise FormatError(f"{self.where}: unknown GGUF metadata value type {vtype}")


def _ggml_type(code: int) -> DType | None:
    from gguf.constants import GGMLQuantizationType

    try:
        name = GGMLQuantizationType(code).name
    except ValueError:
        return None
    return BY_NAME.get(name) if name in BY_NAME else quantized().get(name)


def parse_gguf(fh: BinaryIO, file_size: int, where: str) -> tuple[list[TensorSpan], Splice]:
    """The tensors of a GGUF file (in data order) and the bytes around them."""
    h = _Header(fh, file_size, where)
    if file_size < 24:
        raise FormatError(f"{where}: truncated GGUF file ({file_size} bytes)")
    if bytes(h.take(4)) != b"GGUF":
        raise FormatError(f"{where}: not a GGUF file (no GGUF magic)")
    version = h.unpack("I")
    if version not in (2, 3):
        swapped = version & 0xFFFF == 0
        raise FormatError(f"{where}: {'big-endian GGUF is' if swapped else f'GGUF version {version} is'} not supported (little-endian v2/v3)")
    n_tensors, n_kv = h.unpack("Q"), h.unpack("Q")
    if n_tensors * 24 + n_kv * 12 > file_size:
        raise FormatError(f"{where}: header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold")
    alignment = 32
    for _ in range(n_kv):
        key = h.string()
        vtype = h.unpack("I")
        value = h.value(vtype)
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                raise FormatError(f"{where}: general.alignment must be a power-of-two uint32, got {value!r}")
            alignment = value
    infos, names = [], set()
    for _ in range(n_tensors):
        name = h.string()
        n_dims = h.unpack("I")
        if n_dims > MAX_DIMS:
            raise FormatError(f"{where}: tensor {name!r} has {n_dims} dimensions (GGUF allows {MAX_DIMS})")
        dims = tuple(h.unpack("Q") for _ in range(n_dims))
        code, offset = h.unpack("I"), h.unpack("Q")
        d = _ggml_type(code)
        if d is None:
            raise FormatError(f"{where}: tensor {name!r} has unknown GGML type {code}")
        if name in names:
            raise FormatError(f"{where}: tensor {name!r} appears twice")
        names.add(name)
        n = math.prod(dims)
        if n % d.block or (dims and dims[0] % d.block):
            raise FormatError(f"{where}: tensor {name!r} has {dims[0] if dims else n} values per row, not a multiple of {d.name}'s block of {d.block}")
        if offset % alignment:
            raise FormatError(f"{where}: tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        infos.append((name, d, tuple(reversed(dims)), offset, n // d.block * d.itemsize))
    data_start = -(-h.pos // alignment) * alignment
    spans = sorted((TensorSpan(name, d, shape, data_start + off, nbytes) for name, d, shape, off, nbytes in infos), key=lambda s: s.begin)
    cursor = data_start
    for s in spans:
        if s.begin + s.nbytes > file_size:
            raise FormatError(f"{where}: tensor {s.name!r} runs past the end of the file ({file_size} bytes)")
        if s.begin < cursor:
            raise FormatError(f"{where}: tensor {s.name!r} overlaps the previous tensor")
        if s.begin - cursor >= alignment:
            raise FormatError(f"{where}: {s.begin - cursor} unaccounted bytes before tensor {s.name!r} (more than alignment padding)")
        cursor = max(cursor, s.begin + s.nbytes)
    if spans and file_size - cursor >= alignment:
        raise FormatError(f"{where}: {file_size - cursor} unaccounted bytes after the last tensor (more than alignment padding)")

    def read(begin: int, end: int) -> bytes:
        if end <= len(h.buf):
            return bytes(h.buf[begin:end])
        fh.seek(begin)
        data = fh.read(end - begin)
        if len(data) != end - begin:
            raise FormatError(f"{where}: file shrank while reading it")
        return data

    return spans, splice_spans(spans, file_size, read, where)


class Gguf(SplicedFormat):
    """llama.cpp's container: header, metadata and tensor infos, then aligned tensor data."""

    name = "gguf"
    description = "a GGUF file"
    extensions = (".gguf",)
    exclusive = True

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        with entry.open() as fh:
            return self.record(entry, *parse_gguf(fh, entry.size, entry.url))
