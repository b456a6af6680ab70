"""PyTorch checkpoints: loaded only with `torch.load(weights_only=True)`, refused unless a flat
dict of tensors; pickle-based files of any other kind are refused outright. A checkpoint's
tensors are held in memory; a restore writes an equal state dict, not the same bytes."""
from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from typing import TYPE_CHECKING

from haagenti.errors import FormatError, UnsafeFileError
from haagenti.formats.container import ContainerFormat, FileEntry, ModelFiles, SourceFile, SourceTensor
from haagenti.formats.dtypes import from_torch
from haagenti.formats.splice import Splice
from haagenti.hashing import content_hash

if TYPE_CHECKING:
    import torch  # imported only for PyTorch checkpoints (safetensors never need it)

TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_EXT = (".pkl", ".pickle", ".joblib", ".npy", ".npz")


class TorchCheckpoint(ContainerFormat):
    name = "torch"
    description = "a PyTorch checkpoint"
    extensions = TORCH_EXT
    byte_exact = False

    def claims(self, entry: FileEntry, model: ModelFiles) -> bool:
        return entry.name.lower().endswith(TORCH_EXT + PICKLE_EXT)

    def read(self, entry: FileEntry, model: ModelFiles) -> tuple[SourceFile, list[SourceTensor]]:
        if entry.name.lower().endswith(PICKLE_EXT):
            raise UnsafeFileError(f"{entry.url}: refusing a pickle-based file; convert it to safetensors")
        data = entry.read_all()
        tensors = []
        for key, tensor in load_checkpoint(data, entry.url).items():
            tensor = tensor.detach().contiguous()
            payload = _tensor_bytes(tensor)
            tensors.append(SourceTensor(key, from_torch(tensor.dtype), tuple(tensor.shape), entry.index, len(payload), payload=payload))
        return SourceFile(entry.name, entry.url, self.name, entry.size, blake3=content_hash(data)), tensors

    def splice(self, header: bytes, where: str) -> Splice:
        return Splice([])  # restored from its tensors, not spliced


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
