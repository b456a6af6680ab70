"""Container formats by name, as codecs are (haagenti.codecs.CODECS): the name is what
files.format stores. The order is the order of detection: a file is read by the first format
that claims it (side files, which any folder may hold, last)."""
from __future__ import annotations

from haagenti.errors import DamagedError
from haagenti.formats.container import ContainerFormat, FileEntry, ModelFiles
from haagenti.formats.gguf_file import Gguf
from haagenti.formats.onnx_file import Onnx, OnnxData
from haagenti.formats.safetensors import Safetensors
from haagenti.formats.torch_file import TorchCheckpoint
from haagenti.formats.verbatim import Verbatim

CONTAINERS: dict[str, ContainerFormat] = {f.name: f for f in (Safetensors(), Gguf(), Onnx(), OnnxData(), TorchCheckpoint(), Verbatim())}

MODEL_EXT = tuple(e for f in CONTAINERS.values() if f.holds_tensors for e in f.extensions)  # weight files
SIDE_EXT = tuple(e for f in CONTAINERS.values() if not f.holds_tensors for e in f.extensions)  # configs, tokenizers
WEIGHT_NAMES = ", ".join("/".join(f.extensions) for f in CONTAINERS.values() if f.holds_tensors and f.extensions)  # for messages


def container(name: str) -> ContainerFormat:
    """The format a stored file's record names."""
    try:
        return CONTAINERS[name]
    except (KeyError, TypeError):
        raise DamagedError(f"unknown container format {name!r} in a file record") from None


def detect(entry: FileEntry, model: ModelFiles) -> ContainerFormat | None:
    """The format that reads this file of the model, or None."""
    return next((f for f in CONTAINERS.values() if f.claims(entry, model)), None)


def formats_named(name: str) -> tuple[str, ...]:
    """The formats a file of this name can be recorded as (what ingest can make of it)."""
    out = []
    for f in CONTAINERS.values():
        said = f.named(name)
        if said:
            return (f.name,)
        if said is None:
            out.append(f.name)
    return tuple(out)
