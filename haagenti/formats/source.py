"""Open the files of one model through fsspec and expose its tensors as byte ranges.

A model is one or more files: safetensors shards (streamed, never loaded whole), PyTorch
checkpoints (loaded only with `torch.load(weights_only=True)`), and small side files
(config or index JSON) kept verbatim so a restored folder is complete.
"""
from __future__ import annotations

import io
import pickle
import posixpath
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from haagenti.errors import FormatError, UnsafeFileError
from haagenti.formats.dtypes import DType, from_torch
from haagenti.formats.safetensors import parse_header
from haagenti.fsio import filesystem_for
from haagenti.hashing import content_hash

if TYPE_CHECKING:
    import torch  # imported only for PyTorch checkpoints (safetensors never need it)

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
VERBATIM_EXT = (".json", ".yaml", ".yml", ".txt", ".md")
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
    data_begin: int = 0  # absolute offset in a safetensors file
    payload: bytes | None = None  # checkpoint tensors are held in memory


@dataclass
class SourceFile:
    name: str  # basename as restored
    url: str
    format: str  # "safetensors" | "torch" | "verbatim"
    size: int
    header: bytes = b""  # safetensors header JSON verbatim, or the whole verbatim file
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

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "ModelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, t: SourceTensor, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of tensor `t`'s data."""
        if t.payload is not None:
            return t.payload[begin:end]
        return self.reader.read(self.files[t.file_index].url, t.data_begin + begin, end - begin)

    def iter_chunks(self, t: SourceTensor, chunk_bytes: int) -> Iterator[bytes]:
        """Stream a tensor's data in chunks of `chunk_bytes`."""
        for b in range(0, t.nbytes, chunk_bytes):
            yield self.read(t, b, min(b + chunk_bytes, t.nbytes))

    @property
    def raw_bytes(self) -> int:
        return sum(f.size for f in self.files)


def expand_urls(urls: list[str]) -> list[str]:
    """Turn folder URLs into the model files they hold (sorted, so order is deterministic)."""
    out: list[str] = []
    for url in urls:
        fs, path = filesystem_for(url)
        if fs.isdir(path):
            entries = sorted((e for e in fs.ls(path, detail=True) if e["name"].endswith(SAFETENSORS_EXT + TORCH_EXT + VERBATIM_EXT)), key=lambda e: e["name"])
            if not entries:
                raise FormatError(f"{url}: folder holds no model files")
            for e in entries:
                _regular(e, fs.unstrip_protocol(e["name"]))
            out += [fs.unstrip_protocol(e["name"]) for e in entries]
        elif fs.exists(path):
            out.append(_regular(fs.info(path), url))
        else:
            raise FormatError(f"{url}: no such file")
    return out


def _regular(info: dict, url: str) -> str:
    """Only regular files are read: a FIFO or device named x.safetensors would block a read forever."""
    if info.get("type") != "file":
        raise FormatError(f"{url}: not a regular file ({info.get('type')})")
    return url


def open_model(urls: list[str]) -> ModelSource:
    files = expand_urls(urls)
    names = [posixpath.basename(u.rstrip("/")) for u in files]
    if len(set(names)) != len(names):
        raise FormatError(f"model files must have distinct names, got {names}")
    src = ModelSource(files=[])
    for i, url in enumerate(files):
        fs, path = filesystem_for(url)
        size = fs.size(path)
        name = names[i]
        low = name.lower()
        if low.endswith(SAFETENSORS_EXT):
            with fs.open(path, "rb") as fh:
                h = parse_header(fh, size, url)
            src.files.append(SourceFile(name, url, "safetensors", size, h.header_bytes))
            src.tensors += [
                SourceTensor(t.name, t.dtype, t.shape, i, t.nbytes, data_begin=h.data_start + t.begin) for t in h.tensors
            ]
        elif low.endswith(TORCH_EXT):
            with fs.open(path, "rb") as fh:
                data = fh.read()
            state = load_checkpoint(data, url)
            src.files.append(SourceFile(name, url, "torch", size, blake3=content_hash(data)))
            for key, tensor in state.items():
                tensor = tensor.detach().contiguous()
                payload = _tensor_bytes(tensor)
                src.tensors.append(SourceTensor(key, from_torch(tensor.dtype), tuple(tensor.shape), i, len(payload), payload=payload))
        elif low.endswith(VERBATIM_EXT):
            if size > MAX_VERBATIM_BYTES:
                raise FormatError(f"{url}: side file larger than {MAX_VERBATIM_BYTES} bytes")
            with fs.open(path, "rb") as fh:
                data = fh.read()
            src.files.append(SourceFile(name, url, "verbatim", size, data, content_hash(data)))
        elif low.endswith(PICKLE_EXT):
            raise UnsafeFileError(f"{url}: refusing a pickle-based file; convert it to safetensors")
        else:
            raise FormatError(f"{url}: unknown model file type (expected .safetensors, .pt/.pth/.bin/.ckpt or side .json)")
    if all(f.format == "verbatim" for f in src.files):  # a model file with no tensors (header {}) is valid
        raise FormatError(f"{', '.join(files)}: no model file (.safetensors or a checkpoint), only side files")
    return src


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def load_checkpoint(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Load a PyTorch checkpoint without executing code; refuse anything but a flat tensor dict."""
    import torch

    if not (zipfile.is_zipfile(io.BytesIO(data)) or data[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05")):
        raise FormatError(f"{where}: not a PyTorch checkpoint")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(f"{where}: refused by torch.load(weights_only=True): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FormatError(f"{where}: checkpoint is not a flat dict of tensors")
    return state
