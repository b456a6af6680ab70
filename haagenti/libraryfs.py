"""Read a stored model file without restoring it: an fsspec filesystem over a library.

    fsspec.open("haagenti://MODEL/FILE", library="s3://bucket/lib")
    fsspec.open("haagenti://MODEL/FILE::s3://bucket/lib")      # chained: the library is the inner URL
    FragmentLibrary.open(url).open_file("MODEL", "FILE")

A file is served by range: its verbatim gaps come from the model's record, its tensor data from
the fragments the range covers, fetched, decoded and verified against their ids (one read of
the fragments table per range, through a bounded cache of decoded fragments). So safetensors,
gguf.GGUFReader, DuckDB or Ray Data read a model, or one tensor of it, from a library on S3
without the whole file being written or fetched. A transposed tensor (an ONNX MatMul weight)
is read whole to serve any part of it. PyTorch checkpoints are restored as equal state dicts,
not bytes, and cannot be served by range.
"""
from __future__ import annotations

import bisect

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from haagenti.core import LibraryCore
from haagenti.encode import RawCache
from haagenti.errors import FragmentError, LibraryError
from haagenti.formats.container import Segment, file_end
from haagenti.formats.registry import container
from haagenti.formats.splice import transpose
from haagenti.manifest import ModelManifest


def file_segments(manifest: ModelManifest, file_index: int) -> list[tuple[Segment, tuple[str, ...]]]:
    """The pieces of one stored file in order (its layout segments, haagenti.formats.container),
    each with the ids of the fragments it holds."""
    f = manifest.files[file_index]
    fmt = container(f.format)
    if not fmt.byte_exact:
        raise LibraryError(f"model {manifest.model_id!r}: {f.name} is {fmt.description}, restored from its tensors and not servable by range; use `haagenti restore`")
    tensors = manifest.file_tensors()[file_index]
    segments = f.segments(tensors)
    if file_end(segments) != f.size:
        raise LibraryError(f"model {manifest.model_id!r}: {f.name}'s record describes {file_end(segments)} bytes, the file had {f.size}")
    return [(s, tuple(tensors[s.tensor].fragments[j].fragment_id for j in s.fragments)) for s in segments if s.size]


class LibraryFileSystem(AbstractFileSystem):
    """Models as folders, their files as read-only files: haagenti://MODEL/FILE (MODEL may be
    'org/name'; a file name may hold '/', as in a diffusers folder's 'unet/config.json')."""

    protocol = "haagenti"
    root_marker = ""

    def __init__(self, library=None, fo: str | None = None, target_protocol: str | None = None, target_options: dict | None = None, cache_bytes: int = 256 << 20, **kwargs):
        super().__init__(**kwargs)
        if isinstance(library, LibraryCore):
            self.library = library
        else:
            url = library or (f"{target_protocol}://{fo}" if fo and target_protocol not in (None, "file") else fo)
            if not url:
                raise LibraryError("haagenti:// needs a library: fsspec.open('haagenti://MODEL/FILE', library=URL) or 'haagenti://MODEL/FILE::URL'")
            self.library = LibraryCore.open(url, create=False)
        self.cache = RawCache(cache_bytes)

    @classmethod
    def _strip_protocol(cls, path):
        path = path.split("::")[0] if isinstance(path, str) else path
        if path.startswith("haagenti://"):
            path = path[len("haagenti://") :]
        return path.strip("/")

    def _model_and_name(self, path: str) -> tuple[str, str]:
        """The stored model and file a path names: 'org/name/f' may be model 'org/name' file
        'f' or model 'org' file 'name/f' (a folder's file); a path that names both is refused
        rather than guessed (FragmentLibrary.open_file names the model apart)."""
        parts = self._strip_protocol(path).split("/")
        files = {m["model_id"]: {f["name"] for f in m["files"] or []} for m in self.library.models()}
        found = [("/".join(parts[:n]), "/".join(parts[n:])) for n in (2, 1) if len(parts) > n]
        found = [(mid, name) for mid, name in found if name in files.get(mid, ())]
        if len(found) > 1:
            (a, fa), (b, fb) = found
            raise LibraryError(f"haagenti://{'/'.join(parts)} names both model {a!r}'s {fa} and model {b!r}'s {fb}; open it with FragmentLibrary.open_file(model, name)")
        if not found:
            raise FileNotFoundError(path)
        return found[0]

    def _file(self, path: str) -> tuple[ModelManifest, int]:
        return self.model_file(*self._model_and_name(path))

    def model_file(self, model_id: str, name: str) -> tuple[ModelManifest, int]:
        """A model's manifest and the index of its file `name` (FileNotFoundError if it has none)."""
        manifest = self.library.manifest(model_id)
        for i, f in enumerate(manifest.files):
            if f.name == name:
                return manifest, i
        raise FileNotFoundError(f"{model_id}/{name}")

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        models = self.library.models()
        if not path:
            entries = [{"name": m["model_id"], "size": 0, "type": "directory"} for m in models]
        else:
            entries, dirs = [], set()
            for m in models:
                if not (path == m["model_id"] or path.startswith(m["model_id"] + "/")):
                    continue
                for f in m["files"]:
                    full = f"{m['model_id']}/{f['name']}"
                    if not full.startswith(path + "/"):
                        continue
                    rest = full[len(path) + 1 :]
                    if "/" in rest:
                        dirs.add(f"{path}/{rest.split('/')[0]}")
                    else:
                        entries.append({"name": full, "size": f["size"], "type": "file"})
            entries += [{"name": d, "size": 0, "type": "directory"} for d in sorted(dirs)]
            if not entries:
                raise FileNotFoundError(path)
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        try:
            manifest, i = self._file(path)
            return {"name": path, "size": manifest.files[i].size, "type": "file"}
        except FileNotFoundError:
            pass
        if not path or self.ls(path, detail=False):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise LibraryError("haagenti:// files are read-only")
        manifest, i = self._file(path)
        kwargs.setdefault("cache_type", "none")  # ranges map to fragments; decoded ones are cached here
        return LibraryFile(self, path, manifest, i, block_size=block_size, cache_options=cache_options, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        with self._open(path) as f:
            size = f.size
            start = 0 if start is None else (start + size if start < 0 else start)
            end = size if end is None else (end + size if end < 0 else end)
            return f._fetch_range(max(start, 0), min(end, size))


class LibraryFile(AbstractBufferedFile):
    def __init__(self, fs: LibraryFileSystem, path: str, manifest: ModelManifest, file_index: int, **kwargs):
        self.segments = file_segments(manifest, file_index)
        self.starts = [s.offset for s, _ in self.segments]
        self.model_id = manifest.model_id
        super().__init__(fs, path, mode="rb", size=manifest.files[file_index].size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        first = max(bisect.bisect_right(self.starts, start) - 1, 0)
        covered = []
        for s, ids in self.segments[first:]:
            if s.offset >= end:
                break
            covered.append((s, ids))
        wanted = {fid for _, ids in covered for fid in ids}
        raw = self.fs.library.fetch_raw(wanted, self.fs.cache) if wanted else {}
        out = []
        for s, ids in covered:
            if s.gap is not None:
                data = s.gap
            elif s.turn is not None:
                rows, cols, itemsize = s.turn
                data = transpose(b"".join(raw[f] for f in ids), cols, rows, itemsize)
            else:
                data = raw[ids[0]]
            if len(data) != s.size:  # a verified fragment of another length than its record places: never a file cut short
                raise FragmentError(f"model {self.model_id!r}: fragment {ids[0]}: {len(data)} bytes where the manifest places {s.size}")
            out.append(memoryview(data)[max(start - s.offset, 0) : min(end - s.offset, s.size)])
        return b"".join(out)
