"""Weight-only quantisation of Linear/Conv weights: INT8 per output channel, INT4 per group
of 32 with one scale each (two values packed per byte), FP16/BF16 casts.

Why not torchao or optimum-quanto: on CPU here torchao's Int4WeightOnlyConfig does not run
("Requires mslk") and its int8 path rewrites modules in place, while a schedule needs every
precision's weights side by side, built once, and switched per step; it also needs the exact
bytes each precision holds. That is ~60 lines, below; the maths is the standard symmetric
absmax scheme those libraries use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from haagenti.adaptive.precision import Precision

GROUP = 32


@dataclass
class QuantizedTensor:
    precision: Precision
    shape: torch.Size
    data: torch.Tensor  # int8 (INT8), packed uint8 (INT4), or the cast tensor
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    def dequantize(self) -> torch.Tensor:
        if self.precision is Precision.INT8:
            return (self.data.float() * self.scale).reshape(self.shape)
        if self.precision is Precision.INT4:
            lo, hi = (self.data & 0x0F).to(torch.int8) - 8, (self.data >> 4).to(torch.int8) - 8
            q = torch.stack([lo, hi], dim=-1).reshape(self.scale.shape[0], -1).float()
            flat = (q * self.scale).reshape(-1)[: self.shape.numel()]
            return flat.reshape(self.shape)
        return self.data.float()


def quantize(w: torch.Tensor, p: Precision) -> QuantizedTensor:
    w = w.detach().float()
    if p is Precision.INT8:
        rows = w.reshape(w.shape[0], -1)
        scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        return QuantizedTensor(p, w.shape, torch.round(rows / scale).clamp(-127, 127).to(torch.int8), scale)
    if p is Precision.INT4:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % GROUP
        groups = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, GROUP)
        scale = (groups.abs().amax(1, keepdim=True) / 7).clamp_min(1e-12)
        q = (torch.round(groups / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(-1, 2)
        return QuantizedTensor(p, w.shape, q[:, 0] | (q[:, 1] << 4), scale)
    dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}[p]
    return QuantizedTensor(p, w.shape, w.to(dtype))


class QuantizedWeights:
    """One precision's copy of a model's Linear/Conv weights (other parameters stay FP32)."""

    def __init__(self, model: nn.Module, p: Precision):
        self.precision = p
        self.tensors: dict[str, QuantizedTensor] = {}
        self.passthrough: dict[str, torch.Tensor] = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                self.tensors[f"{mod_name}.weight"] = quantize(mod.weight, p)
        for name, t in model.state_dict().items():
            if name not in self.tensors:
                self.passthrough[name] = t.detach().float()

    @property
    def weight_bytes(self) -> int:
        return sum(q.nbytes for q in self.tensors.values())

    def parameters(self) -> dict[str, torch.Tensor]:
        """Dequantised parameters for torch.func.functional_call (built per use, not kept)."""
        out = dict(self.passthrough)
        out.update({k: q.dequantize() for k, q in self.tensors.items()})
        return out
