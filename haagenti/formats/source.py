"""Open the files of one model through fsspec and expose its tensors as byte ranges.

A model is one or more files, or folders of them (a Hugging Face or diffusers folder, kept as a
tree: names are paths relative to the folder): safetensors shards and GGUF files (streamed,
never loaded whole), ONNX files and their external data, PyTorch checkpoints (loaded only with
`torch.load(weights_only=True)`), and small side files (configs, tokenizers) kept verbatim so a
restored folder is complete.
"""
from __future__ import annotations

import posixpath
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from haagenti.errors import FormatError
from haagenti.formats.container import FileEntry, ModelFiles, SourceFile, SourceTensor
from haagenti.formats.registry import CONTAINERS, MODEL_EXT, SIDE_EXT, WEIGHT_NAMES, container, detect
from haagenti.formats.splice import Turn, transpose
from haagenti.fsio import filesystem_for
from haagenti.hashing import hasher

MAX_NAME = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # model-00001-of-00004.safetensors, llama.cpp's split GGUF
READ_BLOCK = 4 * 1024 * 1024  # read-ahead of remote (s3://, gs://) model files


class RangeReader:
    """Reads byte ranges of files by URL, keeping the last `max_open` handles open (opening a
    file per read cost ~7% of an ingest; on object stores a handle also keeps its read-ahead).
    A range of a tensor the file holds transposed (`turn`) is a range of the tensor turned
    back: the file's matrix is read and turned once, and kept until another is asked for (a
    tensor's fragments are read in order)."""

    def __init__(self, max_open: int = 8):
        self.handles: OrderedDict[str, object] = OrderedDict()
        self.max_open = max_open
        self._turned: tuple[tuple[str, tuple[int, ...]] | None, bytes] = (None, b"")

    def read(self, url: str, offset: int, length: int, turn: Turn | list[int] | None = None) -> bytes:
        """Bytes [offset, offset + length) of the file at `url`, or with `turn` of the tensor it
        holds transposed there."""
        if turn is None:
            return self._read(url, offset, length)
        key = (url, tuple(turn))  # a list where an Arrow row gave it
        if self._turned[0] != key:
            begin, rows, cols, itemsize = turn
            self._turned = (key, transpose(self._read(url, begin, rows * cols * itemsize), rows, cols, itemsize))
        data = self._turned[1][offset : offset + length]
        if len(data) != length:
            raise FormatError(f"{url}: range {offset}+{length} lies outside its transposed tensor")
        return data

    def _read(self, url: str, offset: int, length: int) -> bytes:
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
        self._turned = (None, b"")


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
        """Bytes [begin, end) of tensor `t`'s data (as stored: a transposed tensor is turned
        round whole, once)."""
        if t.payload is not None:
            return t.payload[begin:end]
        url = self.files[t.file_index].url
        turn = t.turn()
        return self.reader.read(url, begin, end - begin, turn) if turn else self.reader.read(url, t.data_begin + begin, end - begin)

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
    return [(url, name, in_folder) for url, name, in_folder, _ in expand_files(urls)]


def expand_files(urls: list[str]) -> list[tuple[str, str, bool, dict]]:
    """expand_urls' files with the info the filesystem gave of each (one request per file or
    folder on an object store)."""
    out: list[tuple[str, str, bool, dict]] = []
    for url in urls:
        fs, path = filesystem_for(url)
        if fs.isdir(path):
            root = path.rstrip("/")
            found = []
            for p, info in sorted(fs.find(root, detail=True).items()):
                rel = p[len(root) :].lstrip("/")
                if not any(part.startswith(".") for part in rel.split("/")[:-1]):
                    found.append((_regular(info, fs.unstrip_protocol(p)), rel, True, info))
            if not found:
                raise FormatError(f"{url}: folder holds no model files")
            out += found
        elif fs.exists(path):
            info = fs.info(path)
            out.append((_regular(info, url), posixpath.basename(url.rstrip("/")), False, info))
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
    side = [n for n in names if n.lower().endswith(SIDE_EXT)]
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
    """Every file of the model checked and located; nothing but headers and side files read.
    Each file is read by the container format that claims it (haagenti.formats.registry)."""
    entries = expand_urls(urls)
    names = [validate_file_name(name, url) for url, name, _ in entries]
    folded = [n.casefold() for n in names]
    if len(set(folded)) != len(folded):  # on a case-insensitive disk a restore would write one over the other
        twice = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
        raise FormatError(f"model files must have names that differ in more than case, got {', '.join(twice[:4])}")
    model = ModelFiles([])
    for i, (url, name, in_folder) in enumerate(entries):
        fs, path = filesystem_for(url)
        model.entries.append(FileEntry(i, url, name, in_folder, fs.size(path)))
    for fmt in CONTAINERS.values():
        model.scans[fmt.name] = fmt.scan(model)
    src = ModelSource(files=[])
    for entry in model.entries:
        fmt = detect(entry, model)
        if fmt is None:
            raise FormatError(f"{entry.url}: unknown model file type (expected {WEIGHT_NAMES} or side .json)")
        f, tensors = fmt.read(entry, model)
        src.files.append(f)
        src.tensors += tensors
    if not any(container(f.format).holds_tensors for f in src.files):  # a model file with no tensors (header {}) is valid
        raise FormatError(f"{', '.join(url for url, _, _ in entries)}: no model file ({WEIGHT_NAMES}), only side files")
    return src
