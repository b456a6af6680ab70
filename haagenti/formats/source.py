"""Open the files of one model through fsspec and expose its tensors as byte ranges.

A model is one or more files, or folders of them (a Hugging Face or diffusers folder, kept as a
tree: names are paths relative to the folder): safetensors shards and GGUF files (streamed,
never loaded whole), ONNX files and their external data, PyTorch checkpoints (loaded only with
`torch.load(weights_only=True)`), and small side files (configs, tokenizers) kept verbatim so a
restored folder is complete.
"""
from __future__ import annotations

import io
import pickle
import posixpath
import re
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from haagenti.errors import FormatError, UnsafeFileError
from haagenti.formats.dtypes import DType, from_torch
from haagenti.formats.gguf_file import parse_gguf
from haagenti.formats.onnx_file import ExternalRef, parse_onnx
from haagenti.formats.safetensors import parse_header
from haagenti.formats.splice import Splice, TensorSpan, splice_spans, transpose
from haagenti.fsio import filesystem_for
from haagenti.hashing import content_hash, hasher

if TYPE_CHECKING:
    import torch  # imported only for PyTorch checkpoints (safetensors never need it)

SAFETENSORS_EXT = (".safetensors",)
GGUF_EXT = (".gguf",)
ONNX_EXT = (".onnx",)
TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
VERBATIM_EXT = (".json", ".yaml", ".yml", ".txt", ".md", ".model", ".jinja")
MAX_NAME = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MODEL_EXT = SAFETENSORS_EXT + GGUF_EXT + ONNX_EXT + TORCH_EXT  # weight files: what a model id from a file name drops
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # model-00001-of-00004.safetensors, llama.cpp's split GGUF
PICKLE_EXT = (".pkl", ".pickle", ".joblib", ".npy", ".npz")
MAX_VERBATIM_BYTES = 16 * 1024 * 1024
READ_BLOCK = 4 * 1024 * 1024  # read-ahead of remote (s3://, gs://) model files


@dataclass
class SourceTensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    file_index: int
    nbytes: int
    data_begin: int = 0  # absolute offset in its file
    payload: bytes | None = None  # checkpoint tensors are held in memory
    transposed: bool = False  # the file holds this tensor's transpose (haagenti.formats.splice)


@dataclass
class SourceFile:
    name: str  # basename as restored
    url: str
    format: str  # "safetensors" | "gguf" | "onnx" | "onnx_data" | "torch" | "verbatim"
    size: int
    header: bytes = b""  # safetensors header JSON verbatim, a spliced file's packed gaps, or a whole side file
    blake3: str = ""  # known up front for checkpoints and side files; safetensors hash as they stream


class RangeReader:
    """Reads byte ranges of files by URL, keeping the last `max_open` handles open (opening a
    file per read cost ~7% of an ingest; on object stores a handle also keeps its read-ahead)."""

    def __init__(self, max_open: int = 8):
        self.handles: OrderedDict[str, object] = OrderedDict()
        self.max_open = max_open

    def read(self, url: str, offset: int, length: int) -> bytes:
        fh = self.handles.get(url)
        if fh is None:
            fs, path = filesystem_for(url)
            fh = self.handles[url] = fs.open(path, "rb", block_size=READ_BLOCK)
            if len(self.handles) > self.max_open:
                self.handles.popitem(last=False)[1].close()  # type: ignore[attr-defined]
        self.handles.move_to_end(url)
        fh.seek(offset)  # type: ignore[attr-defined]
        data = fh.read(length)  # type: ignore[attr-defined]
        if len(data) != length:
            raise FormatError(f"{url}: short read at {offset} (the file shrank or changed while being read)")
        return data

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()  # type: ignore[attr-defined]
        self.handles.clear()


@dataclass
class ModelSource:
    """A model's files and tensors, read through one RangeReader (one handle per file);
    `close()` it, or use it as a context manager."""

    files: list[SourceFile]
    tensors: list[SourceTensor] = field(default_factory=list)
    reader: RangeReader = field(default_factory=lambda: RangeReader(max_open=1 << 30), repr=False)
    _turned: tuple[SourceTensor | None, bytes] = field(default=(None, b""), repr=False)

    def file_digests(self) -> list[str]:
        """Each file's BLAKE3: recorded when known (checkpoints, side files), else read once,
        streaming (what an incremental ingest compares before cutting anything)."""
        out = []
        for f in self.files:
            digest = f.blake3
            if not digest:
                h = hasher()
                fs, path = filesystem_for(f.url)
                with fs.open(path, "rb", block_size=8 << 20) as fh:
                    while chunk := fh.read(8 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
            out.append(digest)
        return out

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, t: SourceTensor, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of tensor `t`'s data (as stored: a transposed tensor is turned
        round whole, once)."""
        if t.payload is not None:
            return t.payload[begin:end]
        if t.transposed:
            if self._turned[0] is not t:
                self._turned = (t, transpose(self._read(t, 0, t.nbytes), t.shape[1], t.shape[0], t.dtype.itemsize))
            return self._turned[1][begin:end]
        return self._read(t, begin, end)

    def _read(self, t: SourceTensor, begin: int, end: int) -> bytes:
        return self.reader.read(self.files[t.file_index].url, t.data_begin + begin, end - begin)

    def iter_chunks(self, t: SourceTensor, chunk_bytes: int) -> Iterator[bytes]:
        """Stream a tensor's data in chunks of `chunk_bytes`."""
        for b in range(0, t.nbytes, chunk_bytes):
            yield self.read(t, b, min(b + chunk_bytes, t.nbytes))

    @property
    def raw_bytes(self) -> int:
        return sum(f.size for f in self.files)


def validate_file_name(name: object, where: str = "") -> str:
    """A model file's name: a relative POSIX path inside the model's folder, of plain
    components (no '', '.' or '..', no backslash or control character, at most 255 bytes each),
    checked on ingest and again before a restore writes it (haagenti.records)."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME
        or "\\" in name
        or _CONTROL.search(name)
        or any(p in ("", ".", "..") or len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts)
    ):
        raise FormatError(f"{where or name!r}: invalid file name {name!r} (a relative path inside the model's folder)")
    if parts[-1] == RESTORE_JOURNAL or parts[-1].endswith(RESTORE_STAGING):
        raise FormatError(f"{where or name!r}: file name {name!r} is one a restore uses for itself")
    return name


RESTORE_JOURNAL = ".haagenti-restore.json"  # in a restore's output folder while it moves its files in
RESTORE_STAGING = ".haagenti-partial"  # a file a restore stages: "." + a random uuid + this, beside its final name


def expand_urls(urls: list[str]) -> list[tuple[str, str, bool]]:
    """(url, name in the model, from a folder) of each file. A folder gives every file under
    it, sorted, named by its path relative to the folder (hidden folders such as .git or
    .cache are skipped)."""
    out: list[tuple[str, str, bool]] = []
    for url in urls:
        fs, path = filesystem_for(url)
        if fs.isdir(path):
            root = path.rstrip("/")
            found = []
            for p, info in sorted(fs.find(root, detail=True).items()):
                rel = p[len(root) :].lstrip("/")
                if not any(part.startswith(".") for part in rel.split("/")[:-1]):
                    found.append((_regular(info, fs.unstrip_protocol(p)), rel, True))
            if not found:
                raise FormatError(f"{url}: folder holds no model files")
            out += found
        elif fs.exists(path):
            out.append((_regular(fs.info(path), url), posixpath.basename(url.rstrip("/")), False))
        else:
            raise FormatError(f"{url}: no such file")
    return out


def strip_model_ext(name: str) -> str:
    """A file name without its weight-file extension, if it has one (`v0.1-alex.safetensors`
    -> `v0.1-alex`, `model-int8.onnx` -> `model-int8`, `config.json` stays)."""
    ext = next((e for e in MODEL_EXT if name.lower().endswith(e)), "")
    return name[: len(name) - len(ext)]


def grouping_doubt(urls: list[str]) -> str | None:
    """Why these files may not be one model, or None: several weight files that are not the
    shards of one file (or an ONNX file and its external data), or side files (configs,
    catalogs) outside a Hugging Face or diffusers folder (one with config.json or
    model_index.json at its top)."""
    if len(urls) == 1:
        fs, path = filesystem_for(urls[0])
        if fs.isdir(path) and any(fs.isfile(posixpath.join(path.rstrip("/"), n)) for n in ("config.json", "model_index.json")):
            return None
    names = [name for _, name, _ in expand_urls(urls)]
    weights = [n for n in names if n.lower().endswith(MODEL_EXT)]
    stems = {_SHARD.sub("", strip_model_ext(posixpath.basename(n))) for n in weights}
    side = [n for n in names if n.lower().endswith(VERBATIM_EXT)]
    if len(stems) > 1:
        return f"{len(weights)} weight files that are not shards of one file ({', '.join(weights[:3])}{', ...' if len(weights) > 3 else ''})"
    if side:
        return f"side files ({', '.join(side[:3])}) outside a Hugging Face or diffusers folder (one with config.json or model_index.json)"
    return None


def _regular(info: dict, url: str) -> str:
    """Only regular files are read: a FIFO or device named x.safetensors would block a read forever."""
    if info.get("type") != "file":
        raise FormatError(f"{url}: not a regular file ({info.get('type')})")
    return url


def open_model(urls: list[str]) -> ModelSource:
    """Every file of the model checked and located; nothing but headers and side files read."""
    entries = expand_urls(urls)
    names = [validate_file_name(name, url) for url, name, _ in entries]
    folded = [n.casefold() for n in names]
    if len(set(folded)) != len(folded):  # on a case-insensitive disk a restore would write one over the other
        twice = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
        raise FormatError(f"model files must have names that differ in more than case, got {', '.join(twice[:4])}")
    onnx = {name: _read_onnx(url, name) for url, name, _ in entries if name.lower().endswith(ONNX_EXT)}
    external: dict[str, list[TensorSpan]] = {}
    for name, (_, _, refs) in onnx.items():
        for ref in refs:
            if ref.location not in names:
                raise FormatError(f"{name}: external data file {ref.location!r} is not among the model's files (ingest the folder)")
            external.setdefault(ref.location, []).append(ref.span)
    src = ModelSource(files=[])
    for i, (url, name, in_folder) in enumerate(entries):
        fs, path = filesystem_for(url)
        size = fs.size(path)
        low = name.lower()
        if low.endswith(SAFETENSORS_EXT):
            with fs.open(path, "rb") as fh:
                h = parse_header(fh, size, url)
            src.files.append(SourceFile(name, url, "safetensors", size, h.header_bytes))
            src.tensors += [
                SourceTensor(t.name, t.dtype, t.shape, i, t.nbytes, data_begin=h.data_start + t.begin) for t in h.tensors
            ]
        elif low.endswith(GGUF_EXT):
            with fs.open(path, "rb") as fh:
                spans, splice = parse_gguf(fh, size, url)
            _add_spliced(src, i, SourceFile(name, url, "gguf", size), spans, splice)
        elif name in onnx:
            spans, splice, _ = onnx[name]
            _add_spliced(src, i, SourceFile(name, url, "onnx", size), spans, splice)
        elif name in external:
            spans = sorted(external[name], key=lambda s: s.begin)
            with fs.open(path, "rb") as fh:
                splice = splice_spans(spans, size, lambda b, e: _read_range(fh, b, e, url), url)
            _add_spliced(src, i, SourceFile(name, url, "onnx_data", size), spans, splice)
        elif low.endswith(TORCH_EXT):
            with fs.open(path, "rb") as fh:
                data = fh.read()
            state = load_checkpoint(data, url)
            src.files.append(SourceFile(name, url, "torch", size, blake3=content_hash(data)))
            for key, tensor in state.items():
                tensor = tensor.detach().contiguous()
                payload = _tensor_bytes(tensor)
                src.tensors.append(SourceTensor(key, from_torch(tensor.dtype), tuple(tensor.shape), i, len(payload), payload=payload))
        elif low.endswith(PICKLE_EXT):
            raise UnsafeFileError(f"{url}: refusing a pickle-based file; convert it to safetensors")
        elif low.endswith(VERBATIM_EXT) or in_folder:
            if size > MAX_VERBATIM_BYTES:
                raise FormatError(f"{url}: side file larger than {MAX_VERBATIM_BYTES} bytes (not a tensor format haagenti reads)")
            with fs.open(path, "rb") as fh:
                data = fh.read()
            src.files.append(SourceFile(name, url, "verbatim", size, data, content_hash(data)))
        else:
            raise FormatError(f"{url}: unknown model file type (expected .safetensors, .gguf, .onnx, .pt/.pth/.bin/.ckpt or side .json)")
    if all(f.format == "verbatim" for f in src.files):  # a model file with no tensors (header {}) is valid
        raise FormatError(f"{', '.join(url for url, _, _ in entries)}: no model file (.safetensors, .gguf, .onnx or a checkpoint), only side files")
    return src


def _read_onnx(url: str, name: str) -> tuple[list[TensorSpan], Splice, list[ExternalRef]]:
    fs, path = filesystem_for(url)
    with fs.open(path, "rb") as fh:
        data = fh.read()
    return parse_onnx(data, name, url)


def _read_range(fh, begin: int, end: int, where: str) -> bytes:
    fh.seek(begin)
    data = fh.read(end - begin)
    if len(data) != end - begin:
        raise FormatError(f"{where}: file shrank while reading it")
    return data


def _add_spliced(src: ModelSource, i: int, f: SourceFile, spans: list[TensorSpan], splice: Splice) -> None:
    src.files.append(SourceFile(f.name, f.url, f.format, f.size, splice.pack()))
    src.tensors += [SourceTensor(s.name, s.dtype, s.shape, i, s.nbytes, data_begin=s.begin, transposed=s.transposed) for s in spans]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _reason(e: Exception) -> str:
    """What torch.load's refusal says is wrong, without its advice to load the file unsafely
    ("weights_only=False will likely succeed") or its pointer to the documentation."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:  # the reason, then advice to allowlist what it refused
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
    advice = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
    said = [line for line in lines if not line.startswith(advice) and "will likely succeed" not in line]
    return (said or [type(e).__name__])[0]


def load_checkpoint(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint without executing code; refuse anything but a flat tensor dict."""
    import torch

    if not (zipfile.is_zipfile(io.BytesIO(data)) or data[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05")):
        raise FormatError(f"{where}: not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():  # a refusal is one line: torch's unpickler warnings are not ours to print
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        raise UnsafeFileError(f"{where}: refused by torch.load(weights_only=True): {_reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FormatError(f"{where}: checkpoint is not a flat dict of tensors")
    return state
