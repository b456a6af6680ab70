"""Torch helpers: restored bytes as tensors, and checkpoints written back (torch is imported
only here and where signatures are computed)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

from haagenti.errors import FragmentError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.manifest import TensorRef

if TYPE_CHECKING:
    import torch


def tensor_of(t: TensorRef, parts: list[bytes | memoryview], out: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor of its dtype and shape (CPU, owning its memory) from its restored bytes in
    pieces: each piece copied once into the tensor, not joined first and copied again. With
    `out` (a contiguous CPU tensor of that dtype and shape, checked by the caller) the pieces
    are copied into it instead: switching a live model's weights allocates nothing."""
    import numpy as np
    import torch

    if out is None:
        out = torch.empty(t.shape, dtype=lookup_dtype(t.dtype).torch_dtype)
    dest = out.detach().view(-1).view(torch.uint8).numpy() if out.numel() else np.empty(0, np.uint8)
    pieces = [np.frombuffer(p, np.uint8) for p in parts]
    if sum(len(p) for p in pieces) != len(dest):
        raise FragmentError(f"tensor {t.name!r}: its fragments hold {sum(len(p) for p in pieces)} bytes, its shape and dtype {len(dest)}")
    pos = 0
    for piece in pieces:
        dest[pos : pos + len(piece)] = piece
        pos += len(piece)
    return out


def checkpoint_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
