"""Side files (configs, tokenizers, a folder's other files): kept whole in their record, so a
restored folder is complete. They hold no tensors."""
from __future__ import annotations

from haagenti.errors import DamagedError, FormatError
from haagenti.formats.container import ContainerFormat, FileEntry, ModelFiles, SourceFile, SourceTensor, StoredFile
from haagenti.formats.splice import Splice

VERBATIM_EXT = (".json", ".yaml", ".yml", ".txt", ".md", ".model", ".jinja")
MAX_VERBATIM_BYTES = 16 * 1024 * 1024


class Verbatim(ContainerFormat):
    name = "verbatim"
    description = "a side file"
    extensions = VERBATIM_EXT
    holds_tensors = False

    def named(self, name: str) -> bool | None:
        return None  # any file found in a model's folder

    def claims(self, entry: FileEntry, model: ModelFiles) -> bool:
        return entry.in_folder or entry.name.lower().endswith(VERBATIM_EXT)

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        if entry.size > MAX_VERBATIM_BYTES:
            raise FormatError(f"{entry.url}: side file larger than {MAX_VERBATIM_BYTES} bytes (not a tensor format haagenti reads)")
        data = entry.read_all()
        return SourceFile(entry.name, entry.url, self.name, entry.size, data), []

    def splice(self, header: bytes, where: str) -> Splice:
        return Splice([header])

    def check_file(self, record: StoredFile, where: str) -> None:
        if len(record.header) != record.size:
            raise DamagedError(f"{where}: side file {record.name!r} holds {len(record.header)} bytes, its record says {record.size}")
