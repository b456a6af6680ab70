"""Torch helpers: restored bytes as tensors, and checkpoints written back (torch is imported
only here and where signatures are computed)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.manifest import TensorRef

if TYPE_CHECKING:
    import torch


def tensor_of(t: TensorRef, data: bytes) -> torch.Tensor:
    """A tensor's restored bytes as a CPU tensor of its dtype and shape (owning a copy)."""
    import torch

    dt = lookup_dtype(t.dtype).torch_dtype
    return torch.frombuffer(bytearray(data), dtype=dt).reshape(t.shape) if data else torch.empty(t.shape, dtype=dt)


def checkpoint_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
