"""Weight-only quantisation. At run time each precision's copy of a denoiser's Linear/Conv2d
layers comes from optimum-quanto (INT8 per output channel, INT4 per group, both weight-only;
chosen over torchao, whose weight-only configs quantise Linear layers only and fail on Conv2d,
see docs/adaptive.md); FP16/BF16 are the FP32 weights rounded through that type.

The hand-written quantiser below is kept for one use only: precision tiers in the fragment
library (tiers.py) store plain int8/uint8 tensors plus scales in safetensors, a storage format,
while quanto's tensors are runtime objects. INT8 is symmetric absmax per output channel (quanto's
INT8 to the bit); INT4 is affine per group of 32 (levels 0..15 between the group's min and max,
scale and shift in bfloat16): the symmetric INT4 grid it replaced wasted half its levels on
one-sided groups and cost 9-12 dB on late DDIM steps (docs/decisions/0311-affine-int4-tiers.md).
Tiers stored with the symmetric grid have no shift and are still read as they were written.
INT6 and INT5 sit between them: affine per output channel, scale and shift in bfloat16 (groups
of 32 would cost INT6 43.8% of FP16's bytes, above the 40% budgets it exists for, and groups of
64 or 128 sampled worse than one grid per channel; docs/decisions/0390-int6-tiers.md). quanto has
no 5- or 6-bit type, so at run time they are this grid too. Every grid below 8 bits packs its
levels densely, 8 levels in `bits` bytes, lowest first (INT4's two nibbles per byte are that layout).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from haagenti.adaptive.precision import Precision
from haagenti.extras import require

GROUP = 32  # INT4's group; INT5/INT6 take one grid per output channel
AFFINE = (Precision.INT4, Precision.INT5, Precision.INT6)  # levels 0..2^bits-1 from a shift, packed


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels (< 2^bits each, a multiple of 8 of them) as uint8, 8 levels per `bits` bytes."""
    words = (levels.reshape(-1, 8).long() << (bits * torch.arange(8))).sum(1, keepdim=True)
    return ((words >> (8 * torch.arange(bits))) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The levels `pack` stored, as int64."""
    words = (data.reshape(-1, bits).long() << (8 * torch.arange(bits))).sum(1, keepdim=True)
    return ((words >> (bits * torch.arange(8))) & ((1 << bits) - 1)).reshape(-1)


@dataclass
class QuantizedTensor:
    precision: Precision
    shape: torch.Size
    data: torch.Tensor  # int8 (INT8), packed uint8 levels (INT4..INT6), or the cast tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None  # INT4..INT6: each group's minimum (None: a symmetric INT4 tier, levels -8..7)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.shift) if t is not None)

    def dequantize(self) -> torch.Tensor:
        if self.precision is Precision.INT8:
            return (self.data.float() * self.scale).reshape(self.shape)
        if self.precision in AFFINE:
            groups = self.scale.shape[0]
            width = GROUP if self.precision is Precision.INT4 else self.shape.numel() // groups
            q = unpack(self.data, self.precision.bits)[: groups * width].reshape(groups, width).float()
            if self.shift is None:
                flat = (q - 8) * self.scale
            else:
                flat = q * self.scale.float() + self.shift.float()
            return flat.reshape(-1)[: self.shape.numel()].reshape(self.shape)
        return self.data.float()


def _affine(groups: torch.Tensor, p: Precision, shape: torch.Size) -> QuantizedTensor:
    """Each row of `groups` on 2^bits levels between its minimum (the shift) and maximum."""
    top = (1 << p.bits) - 1
    shift = groups.amin(1, keepdim=True).to(torch.bfloat16)
    scale = ((groups.amax(1, keepdim=True) - shift.float()) / top).clamp_min(1e-30).to(torch.bfloat16)
    q = torch.round((groups - shift.float()) / scale.float()).clamp(0, top).reshape(-1)  # levels from the stored scale and shift
    return QuantizedTensor(p, shape, pack(F.pad(q, (0, (-q.numel()) % 8)), p.bits), scale, shift)


def quantize(w: torch.Tensor, p: Precision) -> QuantizedTensor:
    w = w.detach().float()
    if p is Precision.INT8:
        rows = w.reshape(w.shape[0], -1)
        scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        return QuantizedTensor(p, w.shape, torch.round(rows / scale).clamp(-127, 127).to(torch.int8), scale)
    if p is Precision.INT4:
        flat = w.reshape(-1)
        pad = (-flat.numel()) % GROUP
        return _affine(F.pad(flat, (0, pad), value=float(flat[-1])).reshape(-1, GROUP), p, w.shape)  # padding inside the last group's range
    if p in AFFINE:
        return _affine(w.reshape(w.shape[0], -1), p, w.shape)
    dtype = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16, Precision.FP32: torch.float32}[p]
    return QuantizedTensor(p, w.shape, w.to(dtype))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, summing the inner tensors of a tensor subclass (quanto's data,
    scales and shifts), so INT8/INT4 sizes include their quantisation parameters."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def held_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct tensor storages the modules' parameters and buffers hold (a tensor
    shared between them, or a tied weight, counted once; quanto's inner tensors included)."""
    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        t = t.data if isinstance(t, nn.Parameter) else t
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            for n in t.__tensor_flatten__()[0]:
                add(getattr(t, n))
            return
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()

    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            add(t)
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())


def install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put `layers` (path -> module) in `model`: a dict assignment per layer, no copy."""
    for path, layer in layers.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layer)


def layer_paths(model: nn.Module) -> list[str]:
    """The layers whose weights a precision changes: every Linear and Conv2d."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class PrecisionLayers:
    """One precision's copy of a model's Linear/Conv2d layers, built once (FP32: the model's own
    layers). `weight_bytes` is what this precision's weights occupy, scales included (INT5/INT6:
    as their library tier packs them; held here dequantised)."""

    def __init__(self, model: nn.Module, p: Precision):
        self.precision = p
        paths = layer_paths(model)
        stored: int | None = None  # bytes of a grid held dequantised here, as its tier stores it
        if p is Precision.FP32:
            self.layers = {k: model.get_submodule(k) for k in paths}
        elif p in (Precision.INT5, Precision.INT6):  # quanto has no 5- or 6-bit type: the library tier's grid
            self.layers, stored = {}, 0
            for k in paths:
                layer = copy.deepcopy(model.get_submodule(k))
                q = quantize(layer.weight.data, p)
                layer.weight.data, stored = q.dequantize(), stored + q.nbytes
                self.layers[k] = layer
        elif p.is_integer:
            require("adaptive")
            from optimum.quanto import freeze, qint4, qint8
            from optimum.quanto import quantize as quanto_quantize

            clone = copy.deepcopy(model)
            quanto_quantize(clone, weights=qint8 if p is Precision.INT8 else qint4)
            freeze(clone)
            self.layers = {k: clone.get_submodule(k) for k in paths}
        else:
            dtype = torch.float16 if p is Precision.FP16 else torch.bfloat16
            self.layers = {}
            for k in paths:
                layer = copy.deepcopy(model.get_submodule(k))
                layer.weight.data = layer.weight.data.to(dtype).float()
                self.layers[k] = layer
        half = p in (Precision.FP16, Precision.BF16)
        self.weight_bytes = stored if stored is not None else sum(m.weight.numel() * 2 if half else tensor_bytes(m.weight) for m in self.layers.values())

    def install(self, model: nn.Module) -> None:
        """Put these layers in `model` (a dict assignment per layer: no copy, no allocation)."""
        install(model, self.layers)
