"""The ONNX containers: an .onnx file, and the external data files its initializers point into.
A strict reader: where each initializer's data lies, in the .onnx file or an external one.

The `onnx` package parses and validates the message (a protobuf: parsing runs nothing from the
file). It does not say where a field's bytes are, so we walk the protobuf wire format for the
top-level graph's initializers and check each `raw_data` range we find holds exactly the bytes
onnx parsed. Everything else (graph, attributes, typed-field initializers, nested graphs) stays
in the verbatim gaps.
"""
from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass

from haagenti.errors import FormatError
from haagenti.formats.dtypes import BY_NAME, DType
from haagenti.formats.container import FileEntry, ModelFiles, SourceFile, SourceTensor, SplicedFormat
from haagenti.formats.splice import Splice, TensorSpan, splice_spans

MAX_ONNX_BYTES = 2**31 - 1  # protobuf's limit on one message; bigger models use external data
# ONNX TensorProto.DataType name -> haagenti dtype; known types not listed (STRING, INT4, ...) stay verbatim
_DTYPES = {
    "FLOAT": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16", "DOUBLE": "F64",
    "INT8": "I8", "INT16": "I16", "INT32": "I32", "INT64": "I64",
    "UINT8": "U8", "UINT16": "U16", "UINT32": "U32", "UINT64": "U64",
    "BOOL": "BOOL", "FLOAT8E4M3FN": "F8_E4M3", "FLOAT8E5M2": "F8_E5M2",
}
_GRAPH, _INITIALIZER, _NAME, _RAW_DATA = 7, 5, 8, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.name/raw_data


@dataclass(frozen=True)
class ExternalRef:
    """An initializer whose data lies in another file of the model."""

    location: str  # the data file's name within the model (resolved against the .onnx file's folder)
    span: TensorSpan  # begin = offset within that file


def _varint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise FormatError(f"{where}: malformed protobuf (bad varint)")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int, where: str):
    """(field number, begin, end) of each length-delimited field of a message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end, where)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end, where)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos, end, where)
            if pos + n > end:
                raise FormatError(f"{where}: malformed protobuf (a field runs past its message)")
            yield key >> 3, pos, pos + n
            pos += n
        else:
            raise FormatError(f"{where}: malformed protobuf (wire type {wire})")
    if pos != end:
        raise FormatError(f"{where}: malformed protobuf (a field runs past its message)")


def _raw_data_ranges(data: bytes, where: str) -> list[tuple[int, int] | None]:
    """Per top-level initializer, in order: the byte range of its raw_data, or None."""
    out = []
    for num, gb, ge in _fields(data, 0, len(data), where):
        if num != _GRAPH:
            continue
        for num2, ib, ie in _fields(data, gb, ge, where):
            if num2 != _INITIALIZER:
                continue
            raw = [(b, e) for num3, b, e in _fields(data, ib, ie, where) if num3 == _RAW_DATA]
            if len(raw) > 1:
                raise FormatError(f"{where}: an initializer holds raw_data twice")
            out.append(raw[0] if raw else None)
    return out


# The right (weight) operand of each matrix product, by (domain, op): the float MatMul and the
# quantized ones onnxruntime's quantizers write in its place (quantize_dynamic: MatMulInteger).
_MATMUL_WEIGHT = {("", "MatMul"): 1, ("", "MatMulInteger"): 1, ("", "QLinearMatMul"): 3,
                  ("com.microsoft", "DynamicQuantizeMatMul"): 1, ("com.microsoft", "MatMulIntegerToFloat"): 1}


def _matmul_weights(graph) -> set[str]:
    """Initializers read as the right operand of a matrix product: exporters fold a Linear
    weight's transpose into them, so the file holds W^T; they are stored as W
    (haagenti.formats.splice), the float weights and their int8/uint8 quantizations alike, so
    fragment k of either covers the same values."""
    out = set()
    for n in graph.node:
        at = _MATMUL_WEIGHT.get(("" if n.domain == "ai.onnx" else n.domain, n.op_type))
        if at is not None and len(n.input) > at and (n.op_type != "MatMul" or len(n.input) == 2):
            out.add(n.input[at])
    return out


def _location(onnx_name: str, location: str, where: str) -> str:
    if not location or location.startswith("/") or "\\" in location or "\0" in location:
        raise FormatError(f"{where}: external data location {location!r} is not a relative path")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(onnx_name), location))
    if resolved.startswith("../") or resolved == "..":
        raise FormatError(f"{where}: external data location {location!r} leaves the model's folder")
    return resolved


def parse_onnx(data: bytes, name: str, where: str) -> tuple[list[TensorSpan], Splice, list[ExternalRef]]:
    """The inline initializers of an ONNX file (in file order), its gaps, and the initializers
    whose data lies in external files. `name` is the file's name within the model."""
    import onnx
    from google.protobuf.message import DecodeError

    if len(data) > MAX_ONNX_BYTES:
        raise FormatError(f"{where}: {len(data)} bytes exceed protobuf's 2 GiB limit on an ONNX file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise FormatError(f"{where}: not a valid ONNX protobuf ({e})") from None
    if not model.HasField("graph"):
        raise FormatError(f"{where}: not an ONNX model (no graph)")
    inits = list(model.graph.initializer)
    names = [init.name for init in inits]
    if len(set(names)) != len(names):  # a model's tensors are told apart by name: restore refuses a record naming one twice
        twice = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"{where}: initializer {twice!r} is listed more than once (ONNX names each initializer once)")
    ranges = _raw_data_ranges(data, where)
    if len(ranges) != len(inits):
        raise FormatError(f"{where}: found {len(ranges)} initializers in the wire format, onnx parsed {len(inits)}")
    transposed = _matmul_weights(model.graph)
    spans, external = [], []
    for init, rng in zip(inits, ranges):
        d = _dtype(init, where)
        dims = tuple(init.dims)
        if any(x < 0 for x in dims):
            raise FormatError(f"{where}: initializer {init.name!r} has a negative dimension {dims}")
        flip = init.name in transposed and len(dims) == 2 and d is not None and (d.is_float or d.name in ("I8", "U8"))
        shape = (dims[1], dims[0]) if flip else dims
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            try:
                offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
            except ValueError:
                raise FormatError(f"{where}: initializer {init.name!r} has a non-integer external offset or length") from None
            need = math.prod(dims) * d.itemsize if d is not None else None
            if length is not None and need is not None and length != need:
                raise FormatError(f"{where}: initializer {init.name!r}: external data of {length} bytes, dims {list(dims)} need {need}")
            if offset < 0 or (length is not None and length < 0):
                raise FormatError(f"{where}: initializer {init.name!r} has a negative external offset or length")
            if d is not None and need:
                external.append(ExternalRef(_location(name, info.get("location", ""), where), TensorSpan(init.name, d, shape, offset, need, flip)))
            continue
        if rng is None:
            continue  # typed fields (float_data, ...) or empty: part of the verbatim protobuf
        begin, end = rng
        if data[begin:end] != init.raw_data:
            raise FormatError(f"{where}: initializer {init.name!r}: raw_data found at {begin} differs from what onnx parsed")
        if d is None:
            continue  # a known type haagenti does not cut (STRING, INT4, ...): stays verbatim
        need = math.prod(dims) * d.itemsize
        if end - begin != need:
            raise FormatError(f"{where}: initializer {init.name!r}: raw_data holds {end - begin} bytes, dims {list(dims)} of {d.name} need {need}")
        if need:
            spans.append(TensorSpan(init.name, d, shape, begin, need, flip))
    spans.sort(key=lambda s: s.begin)
    return spans, splice_spans(spans, len(data), lambda b, e: data[b:e], where), external


def _dtype(init, where: str) -> DType | None:
    import onnx

    try:
        type_name = onnx.TensorProto.DataType.Name(init.data_type)
    except ValueError:
        type_name = "UNDEFINED"
    if type_name == "UNDEFINED" and (init.raw_data or init.data_location == onnx.TensorProto.EXTERNAL):
        raise FormatError(f"{where}: initializer {init.name!r} has unknown tensor type {init.data_type}")
    return BY_NAME[_DTYPES[type_name]] if type_name in _DTYPES else None


@dataclass(frozen=True)
class OnnxScan:
    """A model's .onnx files parsed, and the spans each external data file holds."""

    parsed: dict[str, tuple[list[TensorSpan], Splice]]
    external: dict[str, list[TensorSpan]]


class Onnx(SplicedFormat):
    """An .onnx file: its inline initializers are the tensors, the rest of the protobuf the gaps."""

    name = "onnx"
    description = "an ONNX file"
    extensions = (".onnx",)
    exclusive = True

    def scan(self, model: ModelFiles) -> OnnxScan:
        """Every .onnx file parsed before any other file is read: they say which files are
        external data, and where in them each initializer lies."""
        parsed, external = {}, {}
        names = set(model.names)
        for e in model.entries:
            if not e.name.lower().endswith(self.extensions):
                continue
            spans, splice, refs = parse_onnx(e.read_all(), e.name, e.url)
            parsed[e.name] = (spans, splice)
            for ref in refs:
                if ref.location not in names:
                    raise FormatError(f"{e.name}: external data file {ref.location!r} is not among the model's files (ingest the folder)")
                external.setdefault(ref.location, []).append(ref.span)
        return OnnxScan(parsed, external)

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        return self.record(entry, *model.scans[self.name].parsed[entry.name])  # type: ignore[attr-defined]


class OnnxData(SplicedFormat):
    """A file an .onnx file's initializers point into (any name): the tensors at their spans,
    the bytes between them the gaps."""

    name = "onnx_data"
    description = "an ONNX external data file"

    def named(self, name: str) -> bool | None:
        return None  # whatever the .onnx file calls it

    def claims(self, entry: FileEntry, model: ModelFiles) -> bool:
        return entry.name in model.scans[Onnx.name].external  # type: ignore[attr-defined]

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        spans = sorted(model.scans[Onnx.name].external[entry.name], key=lambda s: s.begin)  # type: ignore[attr-defined]
        with entry.open() as fh:

            def read(begin: int, end: int) -> bytes:
                fh.seek(begin)
                data = fh.read(end - begin)
                if len(data) != end - begin:
                    raise FormatError(f"{entry.url}: file shrank while reading it")
                return data

            return self.record(entry, spans, splice_spans(spans, entry.size, read, entry.url))
